//! Queueing a reply: a slot taken and filled (`queue`, `queue_bytes`), a transport's
//! ready-made train (`queue_with`), and the slot's headers prepared for the kernel.

use super::{Dest, SendError, SendOptions, SendPool, SlotState, MAX_GSO_SEGMENTS};
use crate::datagram::{encode_pktinfo, encode_sockaddr};

impl SendPool {
    /// Queues a reply to `dest` whose payload `fill` writes into a buffer of
    /// `slot_capacity()` bytes, returning its length. The kernel sees it at the next `flush`.
    /// A destination that is no address (unspecified, port 0) is refused (`NoDestination`)
    /// before anything is written. Where the reply queued last went to the same destination
    /// and trains can go there, the reply is written straight after it, into the same slot,
    /// and joins it as a GSO train if it can (`append.rs`).
    pub fn queue(
        &mut self,
        dest: Dest,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        if !dest.is_addressable() {
            return Err(SendError::NoDestination);
        }
        if let Some(last) = self.appendable_last(&dest) {
            return self.append(last, dest, fill);
        }
        self.queue_fresh(dest, fill, true)
    }

    /// [`SendPool::queue`] into a slot of its own; `appendable`: later plain replies to
    /// `dest` may join it.
    pub(super) fn queue_fresh(
        &mut self,
        dest: Dest,
        fill: impl FnOnce(&mut [u8]) -> usize,
        appendable: bool,
    ) -> Result<usize, SendError> {
        if !dest.is_addressable() {
            return Err(SendError::NoDestination);
        }
        let index = self.free.pop().ok_or(SendError::PoolExhausted)?;
        debug_assert_eq!(self.meta[index as usize].state, SlotState::Free);
        match self.prepare(index, dest, fill) {
            Ok(len) => {
                let meta = &mut self.meta[index as usize];
                meta.state = SlotState::Queued;
                meta.appendable = appendable && len > 0;
                self.queued.push(index);
                Ok(len)
            }
            Err(e) => {
                self.free.push(index);
                Err(e)
            }
        }
    }

    /// Queues a reply with `options` (see [`SendOptions`]): a ready-made GSO train, an ECN
    /// mark. A train of more than 64 segments is refused (`TooLong`). Where trains cannot go
    /// (GSO off, or held for `dest`) the train takes one slot per segment; the length
    /// returned is the whole train's either way, and [`SendPool::cancel_since`] with the
    /// `queued_len()` from before the call withdraws all of it.
    pub fn queue_with(
        &mut self,
        dest: Dest,
        options: SendOptions,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let mark = self.queued_len();
        let len = self.queue_fresh(dest, fill, false)?;
        // `queue_fresh` pushed the slot last: it is ours until flushed.
        let Some(&index) = self.queued.last() else {
            return Ok(len);
        };
        let segment = options.segment_size.filter(|&s| s > 0 && s < len);
        let segments = segment.map_or(1, |s| len.div_ceil(s));
        if segments > MAX_GSO_SEGMENTS || segment.is_some_and(|s| s > usize::from(u16::MAX)) {
            self.cancel_since(mark);
            return Err(SendError::TooLong);
        }
        {
            let meta = &mut self.meta[index as usize];
            meta.ecn = options.ecn & 0b11;
        }
        let Some(segment) = segment else {
            return Ok(len);
        };
        if self.trains_to(&dest) {
            let meta = &mut self.meta[index as usize];
            meta.train_segment = segment as u16;
            meta.segments = segments as u16;
            return Ok(len);
        }
        // No trains: each segment gets a slot of its own, copied from the first one.
        if self.free.len() < segments - 1 {
            self.cancel_since(mark);
            return Err(SendError::PoolExhausted);
        }
        self.meta[index as usize].len = segment;
        let ecn = options.ecn;
        let data = self.data;
        let first_at = index as usize * self.stride;
        for n in 1..segments {
            let start = n * segment;
            let end = (start + segment).min(len);
            let result = self.queue_fresh(
                dest,
                |buf| {
                    // SAFETY: `data` points at `count * stride` bytes; slot `index` and the
                    // slot `buf` covers are distinct (the pool hands a slot out once) and both
                    // ours, so the source range and `buf` do not overlap.
                    let first = unsafe {
                        std::slice::from_raw_parts(data.as_ptr().add(first_at + start), end - start)
                    };
                    buf[..end - start].copy_from_slice(first);
                    end - start
                },
                false,
            );
            // Free slots were counted above: a failure here is a bookkeeping bug.
            if result.is_err() {
                self.cancel_since(mark);
                return Err(SendError::PoolExhausted);
            }
            if let Some(&last) = self.queued.last() {
                self.meta[last as usize].ecn = ecn & 0b11;
            }
        }
        Ok(len)
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
        let len = fill(self.data_mut(index));
        if len > self.slot_capacity {
            return Err(SendError::TooLong);
        }
        let socket_is_v6 = self.socket_is_v6;
        let meta = &self.meta[index as usize];
        let (old, name_valid, pktinfo_len) = (meta.dest, meta.name_valid, meta.pktinfo_len);
        let h = self.headers_mut(index);
        let mut name_valid = name_valid && old.peer == dest.peer;
        if dest.connected {
            // A connected socket sends to its peer; an address would only cost a route lookup.
            // The encoded name stays in `name` for a later unconnected send to the same peer.
            h.msg.msg_namelen = 0;
        } else if !name_valid || h.msg.msg_namelen == 0 {
            h.msg.msg_namelen = encode_sockaddr(dest.peer, socket_is_v6, &mut h.name)
                .ok_or(SendError::AddressFamily)?;
            name_valid = true;
        }
        let pktinfo_len = if old.local != dest.local || (dest.local.is_some() && pktinfo_len == 0) {
            match dest.local {
                Some(ip) => encode_pktinfo(ip, &mut h.control),
                None => 0,
            }
        } else {
            pktinfo_len
        };
        let meta = &mut self.meta[index as usize];
        meta.name_valid = name_valid;
        meta.pktinfo_len = pktinfo_len;
        meta.dest = dest;
        meta.len = len;
        meta.segments = 1;
        meta.train_segment = 0;
        meta.ecn = 0;
        meta.appendable = false;
        Ok(len)
    }
}
