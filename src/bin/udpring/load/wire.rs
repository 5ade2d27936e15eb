//! Request and reply formats (plain echo and sockperf ping-pong) and the per-client table that
//! matches replies to requests by sequence number.

use std::collections::VecDeque;
use std::time::Instant;

use udpring::apps::sockperf;

/// Wire format of the requests.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Plain echo: bytes 0..8 = u64 sequence number (big-endian), 8..12 = u32 client id
    /// (big-endian), then padding. Any server that echoes datagrams back works.
    Echo,
    /// sockperf ping-pong: 14-byte big-endian header (u64 seq, u16 flags = CLIENT|PONG_REQUEST,
    /// u32 total length), then padding. Works against `sockperf server` and echo servers.
    Sockperf,
}

impl Proto {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Echo => "echo",
            Proto::Sockperf => "sockperf",
        }
    }

    /// Smallest payload that holds this protocol's header.
    pub fn min_size(self) -> usize {
        match self {
            Proto::Echo => ECHO_MIN_LEN,
            Proto::Sockperf => sockperf::HEADER_LEN,
        }
    }
}

/// Smallest echo request: just the sequence number.
pub const ECHO_MIN_LEN: usize = 8;

/// Writes the request header for `seq` into `buf` (whose length is the request size).
/// Bytes after the header are left untouched (callers prefill padding once).
pub fn encode_request(proto: Proto, buf: &mut [u8], seq: u64, client: u32) {
    match proto {
        Proto::Echo => {
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            if buf.len() >= 12 {
                buf[8..12].copy_from_slice(&client.to_be_bytes());
            }
        }
        Proto::Sockperf => sockperf::Header {
            sequence: seq,
            flags: sockperf::FLAG_CLIENT | sockperf::FLAG_PONG_REQUEST,
            length: u32::try_from(buf.len()).unwrap_or(u32::MAX),
        }
        .write(buf),
    }
}

/// Extracts the sequence number from a reply, or `None` if the datagram is not a reply to
/// `client` in this protocol.
pub fn decode_reply(proto: Proto, buf: &[u8], client: u32) -> Option<u64> {
    match proto {
        Proto::Echo => {
            let seq = u64::from_be_bytes(buf.get(..8)?.try_into().ok()?);
            match buf.get(8..12) {
                Some(id) if id != client.to_be_bytes() => None,
                _ => Some(seq),
            }
        }
        // A sockperf server clears CLIENT in its reply, an echo server does not; both are
        // fine. Only insist that the header is complete.
        Proto::Sockperf => sockperf::Header::parse(buf).ok().map(|h| h.sequence),
    }
}

/// One request of a client, in flight or settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Latency origin: first send (closed loop) or scheduled send time (open loop).
    pub origin: Instant,
    /// Resends so far.
    pub resends: u32,
    /// Still waiting for a reply.
    pub pending: bool,
    /// Sent after the warm-up, so it counts in the report.
    pub counted: bool,
}

/// Requests of one client, indexed by sequence number (sequence numbers are consecutive, so
/// lookup is `seq - base`). Settled requests at the front are dropped.
#[derive(Debug)]
pub struct Outstanding {
    base_seq: u64,
    slots: VecDeque<Slot>,
    pending: usize,
}

impl Outstanding {
    /// Empty table whose first request gets `first_seq`.
    pub fn new(first_seq: u64) -> Self {
        Outstanding {
            base_seq: first_seq,
            slots: VecDeque::new(),
            pending: 0,
        }
    }

    /// Registers a new pending request and returns its sequence number.
    pub fn push(&mut self, origin: Instant, counted: bool) -> u64 {
        let seq = self.base_seq + self.slots.len() as u64;
        self.slots.push_back(Slot {
            origin,
            resends: 0,
            pending: true,
            counted,
        });
        self.pending += 1;
        seq
    }

    /// Requests still waiting for a reply.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The pending request `seq`, if any.
    pub fn get_pending_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let idx = usize::try_from(seq.checked_sub(self.base_seq)?).ok()?;
        self.slots.get_mut(idx).filter(|s| s.pending)
    }

    /// Settles request `seq` (answered or given up) and returns it; `None` if it is unknown or
    /// already settled (a duplicate or stray reply).
    pub fn settle(&mut self, seq: u64) -> Option<Slot> {
        let slot = self.get_pending_mut(seq)?;
        slot.pending = false;
        let out = *slot;
        self.pending -= 1;
        while self.slots.front().is_some_and(|s| !s.pending) {
            self.slots.pop_front();
            self.base_seq += 1;
        }
        Some(out)
    }

    /// Iterates over pending requests.
    pub fn iter_pending(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_roundtrip() {
        let mut buf = vec![0u8; 64];
        encode_request(Proto::Echo, &mut buf, 0x0102_0304_0506_0708, 7);
        assert_eq!(&buf[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[8..12], &[0, 0, 0, 7]);
        assert_eq!(
            decode_reply(Proto::Echo, &buf, 7),
            Some(0x0102_0304_0506_0708)
        );
        // Another client's reply is not ours.
        assert_eq!(decode_reply(Proto::Echo, &buf, 8), None);
        // Minimal 8-byte request: seq only.
        let mut small = [0u8; 8];
        encode_request(Proto::Echo, &mut small, 42, 3);
        assert_eq!(decode_reply(Proto::Echo, &small, 9), Some(42));
        assert_eq!(decode_reply(Proto::Echo, &small[..7], 3), None);
    }

    #[test]
    fn sockperf_header() {
        let mut buf = vec![0xEEu8; 64];
        encode_request(Proto::Sockperf, &mut buf, 5, 1);
        assert_eq!(&buf[..8], &5u64.to_be_bytes());
        assert_eq!(u16::from_be_bytes([buf[8], buf[9]]), 3); // CLIENT | PONG_REQUEST
        assert_eq!(u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]), 64);
        assert_eq!(buf[14], 0xEE, "padding untouched");
        assert_eq!(decode_reply(Proto::Sockperf, &buf, 1), Some(5));
        // A sockperf server's reply has CLIENT cleared; still a reply.
        buf[9] = 2;
        assert_eq!(decode_reply(Proto::Sockperf, &buf, 1), Some(5));
        assert_eq!(decode_reply(Proto::Sockperf, &buf[..13], 1), None);
    }

    #[test]
    fn seq_matching() {
        let t = Instant::now();
        let mut o = Outstanding::new(1);
        let s1 = o.push(t, true);
        let s2 = o.push(t, false);
        let s3 = o.push(t, true);
        assert_eq!((s1, s2, s3), (1, 2, 3));
        assert_eq!(o.pending(), 3);
        // Out of order answer.
        assert!(o.settle(2).is_some_and(|s| !s.counted));
        assert_eq!(o.pending(), 2);
        // Duplicate and unknown replies are strays.
        assert!(o.settle(2).is_none());
        assert!(o.settle(0).is_none());
        assert!(o.settle(99).is_none());
        assert!(o.settle(1).is_some());
        // Front settled: 1 and 2 dropped, 3 still addressable.
        assert_eq!(o.slots.len(), 1);
        assert!(o.get_pending_mut(3).is_some());
        assert!(o.settle(3).is_some_and(|s| s.counted));
        assert_eq!(o.pending(), 0);
        assert_eq!(o.push(t, true), 4);
        assert!(o.settle(1).is_none(), "old seq after compaction is stray");
    }
}
