//! The handler API and the built-in handlers (`--app echo|discard|sockperf`).
//!
//! A handler runs on its worker's thread, one instance per worker, so it needs no locks. It is
//! given each datagram's bytes borrowed straight from the kernel-filled receive buffer (no
//! copy) and a [`Reply`] to answer through; replies are batched and submitted once per loop
//! turn.

use std::net::{IpAddr, SocketAddr};

use crate::send_pool::{SendError, SendPool};
use crate::sockperf;
use crate::stats::Counters;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Who sent it. IPv4 peers of a dual-stack socket appear as plain IPv4.
    pub peer: SocketAddr,
    /// The local address it was sent to, when the socket is bound to a wildcard address; a
    /// reply leaves from it, so a multi-homed host answers from the address it was asked on.
    pub local: Option<IpAddr>,
    /// The payload, borrowed from the receive buffer until the handler returns.
    pub payload: &'a [u8],
    /// Index of the worker (and ring) that received it.
    pub worker: usize,
}

/// Serves datagrams on one worker. Create one per worker with the factory given to
/// [`crate::Server::start`]; it lives on that worker's thread and so needs no synchronisation.
pub trait Handler: 'static {
    /// Called once per received datagram, exactly once, in arrival order for that socket.
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>);
}

/// The way a handler answers. Every reply is queued for the kernel or counted as dropped:
/// nothing is lost silently.
pub struct Reply<'a> {
    pub(crate) pool: &'a mut SendPool,
    pub(crate) counters: &'a mut Counters,
    pub(crate) peer: SocketAddr,
    pub(crate) local: Option<IpAddr>,
}

impl Reply<'_> {
    /// Sends `bytes` back to the datagram's sender.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        self.send_with(|buf| {
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            bytes.len()
        })
    }

    /// Builds the reply in place: `fill` writes into the send buffer (`max_len()` bytes) and
    /// returns the reply's length. Saves a copy when the reply is computed, not copied.
    pub fn send_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> Result<(), SendError> {
        let peer = self.peer;
        self.send_to_with(peer, fill)
    }

    /// Sends `bytes` to another address from the same socket (for relays and fan-out).
    pub fn send_to(&mut self, peer: SocketAddr, bytes: &[u8]) -> Result<(), SendError> {
        self.send_to_with(peer, |buf| {
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            bytes.len()
        })
    }

    fn send_to_with(
        &mut self,
        peer: SocketAddr,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), SendError> {
        let result = self.pool.queue(peer, self.local, fill);
        if result.is_err() {
            self.counters.send_dropped += 1;
        }
        result.map(|_| ())
    }

    /// Replies that can still be queued in this loop turn. The engine guarantees at least one
    /// when it calls a handler.
    pub fn capacity(&self) -> usize {
        self.pool.free_slots()
    }

    /// The longest reply a send slot holds (`--max-datagram`).
    pub fn max_len(&self) -> usize {
        self.pool.slot_capacity()
    }

    /// Records that this datagram was bad input (counted as `bad_input`).
    pub fn count_bad_input(&mut self) {
        self.counters.bad_input += 1;
    }
}

/// RFC 862 echo: every datagram goes back to its sender unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Handler for Echo {
    #[inline]
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        // A failed send is already counted by `Reply`; UDP peers retransmit.
        let _ = reply.send(datagram.payload);
    }
}

/// RFC 863 discard: reads and drops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl Handler for Discard {
    #[inline]
    fn on_datagram(&mut self, _datagram: &Datagram<'_>, _reply: &mut Reply<'_>) {}
}

/// Answers the `sockperf` tool: a request whose header carries the PONG-request flag is sent
/// back whole with the CLIENT flag cleared; other well-formed messages are only counted as
/// received; datagrams too short for a header are counted as bad input.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sockperf;

impl Handler for Sockperf {
    #[inline]
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        let payload = datagram.payload;
        let header = match sockperf::Header::parse(payload) {
            Ok(h) => h,
            Err(_) => {
                reply.count_bad_input();
                return;
            }
        };
        if !header.wants_reply() {
            return;
        }
        let _ = reply.send_with(|buf| {
            if buf.len() < payload.len() {
                return payload.len();
            }
            buf[..payload.len()].copy_from_slice(payload);
            sockperf::mark_as_reply(&mut buf[..payload.len()]);
            payload.len()
        });
    }
}

/// Drives a handler without sockets or a ring: hand it datagrams, collect its replies. For
/// unit-testing handlers (sans-IO) and for benchmarking the dispatch path.
pub struct Harness {
    pool: SendPool,
    counters: Counters,
}

impl Harness {
    /// Replies up to `max_len` bytes, at most `slots` per datagram.
    pub fn new(max_len: usize, slots: usize) -> Harness {
        Harness {
            pool: SendPool::new(slots, max_len, -1, false, false),
            counters: Counters::default(),
        }
    }

    /// Calls the handler once; `on_reply` sees each reply it made, in order.
    pub fn deliver<H: Handler>(
        &mut self,
        handler: &mut H,
        datagram: &Datagram<'_>,
        on_reply: impl FnMut(SocketAddr, &[u8]),
    ) {
        self.counters.rx_datagrams += 1;
        let mut reply = Reply {
            pool: &mut self.pool,
            counters: &mut self.counters,
            peer: datagram.peer,
            local: datagram.local,
        };
        handler.on_datagram(datagram, &mut reply);
        self.pool.take_queued(on_reply);
    }

    /// What the handler counted (`bad_input`, `send_dropped`, ...).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// The built-in handlers, by name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum App {
    /// RFC 862 echo.
    Echo,
    /// RFC 863 discard.
    Discard,
    /// Replies to `sockperf ping-pong` / `under-load` clients.
    Sockperf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(payload: &[u8]) -> Datagram<'_> {
        Datagram {
            peer: "192.0.2.1:4000".parse().unwrap(),
            local: None,
            payload,
            worker: 0,
        }
    }

    fn replies<H: Handler>(h: &mut H, harness: &mut Harness, payload: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        harness.deliver(h, &datagram(payload), |peer, bytes| {
            assert_eq!(peer, "192.0.2.1:4000".parse().unwrap());
            out.push(bytes.to_vec());
        });
        out
    }

    #[test]
    fn echo_and_discard() {
        let mut harness = Harness::new(1500, 4);
        assert_eq!(
            replies(&mut Echo, &mut harness, b"abc"),
            vec![b"abc".to_vec()]
        );
        assert_eq!(
            replies(&mut Echo, &mut harness, b""),
            vec![Vec::<u8>::new()]
        );
        assert!(replies(&mut Discard, &mut harness, b"abc").is_empty());
    }

    #[test]
    fn echo_of_an_overlong_datagram_is_dropped_and_counted() {
        let mut harness = Harness::new(4, 4);
        assert!(replies(&mut Echo, &mut harness, b"too long").is_empty());
        assert_eq!(harness.counters().send_dropped, 1);
    }

    #[test]
    fn sockperf_replies_only_to_pong_requests() {
        let mut harness = Harness::new(1500, 4);
        let mut msg = vec![0u8; 20];
        sockperf::Header {
            sequence: 9,
            flags: sockperf::FLAG_CLIENT | sockperf::FLAG_PONG_REQUEST,
            length: 20,
        }
        .write(&mut msg);
        let out = replies(&mut Sockperf, &mut harness, &msg);
        assert_eq!(out.len(), 1);
        assert_eq!(
            sockperf::Header::parse(&out[0]).unwrap().flags,
            sockperf::FLAG_PONG_REQUEST
        );
        msg[9] = sockperf::FLAG_CLIENT as u8;
        assert!(replies(&mut Sockperf, &mut harness, &msg).is_empty());
        assert!(replies(&mut Sockperf, &mut harness, b"tiny").is_empty());
        assert_eq!(harness.counters().bad_input, 1);
    }
}
