//! The receiver: the provided-buffer ring the kernel receives into, the backlog of received
//! datagrams (each holding its buffer until the handler has seen it), parsing, counting and
//! the split of GRO trains, with backpressure when reply slots run out. It hands each
//! datagram to a `Sink` (the worker's `Delivery`: router, sessions, handler) and never calls
//! a handler itself.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};

use super::io::{Io, BUF_GROUP};
use super::log_limit::LogLimit;
use super::router::Source;
use crate::buf_ring::{BufRing, RecvBuf};
use crate::config::{ServerConfig, SessionMode};
use crate::datagram::{
    decode_sockaddr, find_ecn, find_gro_segment_size, find_pktinfo, parse_recvmsg_out, CONTROL_LEN,
    RECVMSG_OUT_LEN, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN,
};
use crate::op::{OpKind, UserData};
use crate::ring::{buffer_id, Completion};
use crate::session_socket::Drained;
use crate::socket::BoundSocket;
use crate::stats::Stats;

/// How a receive buffer is laid out: the `recvmsg_out` header, the peer's address, control
/// messages, the payload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub name_space: usize,
    pub control_space: usize,
    pub buf_len: usize,
}

impl Layout {
    pub fn new(socket: &BoundSocket, config: &ServerConfig) -> Layout {
        // Per-client sockets may be IPv4 under an IPv6 listener: always leave room for the
        // larger address when sessions have their own sockets.
        let own_sockets = matches!(
            config.sessions,
            SessionMode::Connected | SessionMode::PortPerClient
        );
        let name_space = if socket.is_v6 || own_sockets {
            SOCKADDR_IN6_LEN
        } else {
            SOCKADDR_IN_LEN
        };
        let control_space = if socket.wants_pktinfo || socket.gro || config.ecn {
            CONTROL_LEN
        } else {
            0
        };
        // A GRO receive holds up to 64 KiB of merged datagrams whatever --max-datagram says
        // (a shorter buffer would truncate the train). The buffers are anonymous memory: a
        // page is resident only once a receive has written into it.
        let payload_room = if socket.gro {
            config.max_datagram.max(usize::from(u16::MAX))
        } else {
            config.max_datagram
        };
        Layout {
            name_space,
            control_space,
            buf_len: RECVMSG_OUT_LEN + name_space + control_space + payload_room,
        }
    }
}

/// A datagram waiting for the handler.
enum Pending {
    /// In a receive buffer (the usual case); recycled once the handler has seen it. A GRO
    /// train is handed over one datagram at a time: `delivered` counts those already seen,
    /// so backpressure can pause in the middle of a train and resume where it stopped.
    Buffer {
        buf: RecvBuf,
        source: Source,
        delivered: u16,
    },
    /// Copied out: read from a closing session socket, or forwarded by another worker.
    Owned {
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: Vec<u8>,
        source: Source,
    },
}

/// One datagram on its way to the handler, borrowed from its buffer.
#[derive(Clone, Copy)]
pub(super) struct Incoming<'a> {
    pub source: Source,
    pub peer: SocketAddr,
    pub local: Option<IpAddr>,
    pub ecn: u8,
    pub payload: &'a [u8],
    /// `Some(segment size)`: a whole GRO train (`SessionHandler::WHOLE_TRAINS`).
    pub train: Option<usize>,
}

/// Where the receiver hands datagrams.
pub(super) trait Sink {
    /// GRO trains go whole to the handler (`SessionHandler::WHOLE_TRAINS`).
    const WHOLE_TRAINS: bool;
    /// A reply slot is free: a handler may be called.
    fn can_reply(&self) -> bool;
    /// Hands over one datagram (or a whole train).
    fn deliver(&mut self, incoming: Incoming<'_>, stats: &mut Stats);
}

pub(super) struct Receiver {
    bufs: BufRing,
    /// Never grows past the buffer count plus what was copied out: each buffered entry holds
    /// a buffer.
    backlog: VecDeque<Pending>,
    name_space: usize,
    control_space: usize,
    /// The listener is bound to a wildcard address: its datagrams carry packet-info.
    pktinfo: bool,
    /// `ServerConfig::ecn`: receives carry the TOS / traffic class byte.
    ecn: bool,
    /// `--max-datagram`: longer datagrams are counted as truncated, even inside a GRO train.
    max_datagram: usize,
    /// Backpressure was counted and has not ended yet.
    backpressured: bool,
    log: LogLimit,
    worker: usize,
}

impl Receiver {
    /// `--buffers` buffers laid out as `layout` says, registered with `io`'s ring.
    pub fn new(
        io: &Io,
        layout: Layout,
        config: &ServerConfig,
        worker: usize,
    ) -> io::Result<Receiver> {
        let mut bufs = BufRing::new(config.buffers, layout.buf_len as u32, BUF_GROUP)?;
        bufs.register(io.ring()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot register the provided buffer ring ({e}): needs Linux 5.19+"),
            )
        })?;
        Ok(Receiver {
            bufs,
            backlog: VecDeque::with_capacity(usize::from(config.buffers)),
            name_space: layout.name_space,
            control_space: layout.control_space,
            pktinfo: io.listener().wants_pktinfo,
            ecn: config.ecn,
            max_datagram: config.max_datagram,
            backpressured: false,
            log: LogLimit::new(),
            worker,
        })
    }

    /// Nothing waits for the handler.
    pub fn is_idle(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> usize {
        self.bufs.available()
    }

    /// Puts the buffer tokens refused so far into `stats` (see `BufRing::count_refused`).
    pub fn count_refused(&self, stats: &mut Stats) {
        self.bufs.count_refused(stats);
    }

    /// Makes the turn's recycled buffers visible to the kernel.
    pub fn publish(&self) {
        self.bufs.publish();
    }

    /// Queues a receive completion's datagram for the handler, or counts its error.
    ///
    /// The worker hands over only completions drained from its own ring (`Io`), the one
    /// `bufs` is registered on (see `take_buffer`).
    pub fn take(&mut self, c: Completion, source: Source, stats: &mut Stats) {
        let result = c.result();
        if result >= 0 {
            match self.take_buffer(c) {
                Some(buf) => self.backlog.push_back(Pending::Buffer {
                    buf,
                    source,
                    delivered: 0,
                }),
                None => stats.malformed += 1,
            }
            return;
        }
        match -result {
            // The ring ran dry: the multishot request ended. It is armed again at the end of
            // the turn, once the handler has returned buffers.
            libc::ENOBUFS => stats.enobufs += 1,
            libc::ECANCELED => {}
            errno => {
                stats.recv_errors += 1;
                if let Some(held_back) = self.log.check() {
                    tracing::warn!(worker = self.worker, error = %io::Error::from_raw_os_error(errno), held_back, "receive failed");
                }
            }
        }
    }

    /// The buffer a receive completion filled, taken out of the ring; the completion is spent
    /// (it is not `Copy`), so one completion yields at most one token. `None` when the
    /// completion carries no buffer, failed, or names a buffer outside the ring or one that is
    /// lent already (counted by the caller).
    fn take_buffer(&mut self, c: Completion) -> Option<RecvBuf> {
        let bid = buffer_id(c.flags())?;
        let len = u32::try_from(c.result()).ok()?;
        let kind = UserData::decode(c.user_data()).map(|ud| ud.kind);
        debug_assert!(matches!(kind, Some(OpKind::Recv | OpKind::SessionRecv)));
        // SAFETY: only `Ring::drain` makes a `Completion`, and the worker passes here only
        // those of its own ring (`Io`), the one ring `bufs` is registered on (`new`); it is
        // consumed here, so the kernel reported `bid` filled once. The only requests with
        // BUFFER_SELECT on that ring are the worker's multishot receives (`Io::arm_recv`,
        // `Io::arm_session_recv`), and each selects from `BUF_GROUP`, which only `bufs`
        // registers there. `take` refuses an id that is lent already in every build.
        unsafe { self.bufs.take(bid, len) }
    }

    /// Queues what a retiring session socket still held, routed as if it had reached the
    /// listener; datagrams longer than `--max-datagram` were counted as truncated.
    pub fn requeue(&mut self, drained: Drained, stats: &mut Stats) {
        stats.truncated += drained.truncated;
        for (peer, payload) in drained.datagrams {
            stats.rx_datagrams += 1;
            stats.rx_bytes += payload.len() as u64;
            self.backlog.push_back(Pending::Owned {
                peer,
                local: None,
                payload,
                source: Source::Listener,
            });
        }
    }

    /// Queues a datagram another worker received for a peer this one owns.
    pub fn forwarded(&mut self, peer: SocketAddr, local: Option<IpAddr>, payload: Vec<u8>) {
        self.backlog.push_back(Pending::Owned {
            peer,
            local,
            payload,
            source: Source::Forwarded,
        });
    }

    /// Hands pending datagrams to `sink` while a reply slot is free. With every slot in
    /// flight it stops: the buffers stay held, the kernel runs out of them and stops
    /// delivering (ENOBUFS), and datagrams wait in the socket's queue instead of in memory
    /// we would have to grow.
    pub fn deliver(&mut self, sink: &mut impl Sink, stats: &mut Stats) {
        while !self.backlog.is_empty() {
            if !sink.can_reply() {
                self.note_backpressure(stats);
                return;
            }
            self.backpressured = false;
            match self.backlog.pop_front() {
                Some(Pending::Buffer {
                    buf,
                    source,
                    mut delivered,
                }) => {
                    if self.split(&buf, source, &mut delivered, sink, stats) {
                        self.bufs.recycle(buf);
                    } else {
                        // Out of reply slots in the middle of a GRO train: resume later.
                        self.backlog.push_front(Pending::Buffer {
                            buf,
                            source,
                            delivered,
                        });
                        self.note_backpressure(stats);
                        return;
                    }
                }
                Some(Pending::Owned {
                    peer,
                    local,
                    payload,
                    source,
                }) => {
                    let incoming = Incoming {
                        source,
                        peer,
                        local,
                        ecn: 0,
                        payload: &payload,
                        train: None,
                    };
                    sink.deliver(incoming, stats);
                }
                None => return,
            }
        }
    }

    fn note_backpressure(&mut self, stats: &mut Stats) {
        if !self.backpressured {
            self.backpressured = true;
            stats.backpressure += 1;
        }
    }

    /// Parses one received buffer, counts it and hands over its datagram, or the datagrams
    /// of a GRO train from number `delivered` on. Returns `false` when it stopped in the
    /// middle of a train because no reply slot is free (`delivered` then says where to
    /// resume).
    fn split<S: Sink>(
        &self,
        buf: &RecvBuf,
        source: Source,
        delivered: &mut u16,
        sink: &mut S,
        stats: &mut Stats,
    ) -> bool {
        let bytes = self.bufs.bytes(buf);
        let (peer, local, ecn, payload, segment) =
            match parse_recvmsg_out(bytes, self.name_space, self.control_space) {
                Ok(out) if out.is_truncated() => {
                    stats.truncated += 1;
                    return true;
                }
                Ok(out) => {
                    let Ok(peer) = decode_sockaddr(out.name) else {
                        stats.malformed += 1;
                        return true;
                    };
                    let local = if self.pktinfo && source == Source::Listener {
                        find_pktinfo(out.control)
                    } else {
                        None
                    };
                    let segment = find_gro_segment_size(out.control).map(usize::from);
                    let ecn = if self.ecn { find_ecn(out.control) } else { 0 };
                    (peer, local, ecn, out.payload, segment)
                }
                Err(_) => {
                    stats.malformed += 1;
                    return true;
                }
            };
        // A "train" of one datagram is a plain receive.
        let segment = segment.filter(|&s| s < payload.len());
        if *delivered == 0 {
            let count = segment.map_or(1, |s| payload.len().div_ceil(s));
            if segment.unwrap_or(payload.len()) > self.max_datagram {
                stats.truncated += count as u64;
                return true;
            }
            stats.rx_datagrams += count as u64;
            stats.rx_bytes += payload.len() as u64;
            if count > 1 {
                stats.gro_trains += 1;
            }
        }
        let mut incoming = Incoming {
            source,
            peer,
            local,
            ecn,
            payload,
            train: None,
        };
        let Some(segment) = segment else {
            sink.deliver(incoming, stats);
            return true;
        };
        if S::WHOLE_TRAINS {
            incoming.train = Some(segment);
            sink.deliver(incoming, stats);
            return true;
        }
        let mut start = usize::from(*delivered) * segment;
        while start < payload.len() {
            if *delivered > 0 && !sink.can_reply() {
                return false;
            }
            let end = (start + segment).min(payload.len());
            incoming.payload = &payload[start..end];
            sink.deliver(incoming, stats);
            *delivered += 1;
            start = end;
        }
        true
    }

    /// Ends the buffer group's registration once nothing is in flight on `io`'s ring, so
    /// that `Drop` may unmap the buffers; with anything still in flight (a shutdown that
    /// timed out) it stays registered and the buffers are leaked, never freed under the
    /// kernel. Called by the worker's teardown while the ring is still open.
    pub fn release_buffers(&mut self, io: &Io) {
        if io.in_flight() > 0 {
            return;
        }
        // SAFETY: the ledger records every receive the worker arms (listener and session
        // sockets, the only requests that select from the group) until its final completion,
        // and it shows none in flight.
        if let Err(e) = unsafe { self.bufs.unregister(io.ring()) } {
            tracing::warn!(error = %e, "cannot unregister the provided buffer ring");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if self.bufs.refused() > 0 {
            // Each one a bug (a buffer reported twice, a token recycled twice or into the
            // wrong ring), refused so the kernel never wrote into a buffer being read.
            tracing::error!(
                refused = self.bufs.refused(),
                "receive buffer tokens were refused"
            );
        }
        // `bufs` drops after this body: it unmaps only if `release_buffers` unregistered it.
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::worker::io::tests::io;

    /// A sink with `slots` reply slots that records what it is handed.
    struct Recorder {
        slots: usize,
        seen: Vec<(SocketAddr, Vec<u8>)>,
    }

    impl Sink for Recorder {
        const WHOLE_TRAINS: bool = false;

        fn can_reply(&self) -> bool {
            self.slots > 0
        }

        fn deliver(&mut self, incoming: Incoming<'_>, _stats: &mut Stats) {
            assert!(self.slots > 0, "handed a datagram with no reply slot free");
            self.slots -= 1;
            self.seen.push((incoming.peer, incoming.payload.to_vec()));
        }
    }

    fn receiver(io: &Io) -> Receiver {
        let config = ServerConfig {
            buffers: 4,
            max_datagram: 1024,
            ..ServerConfig::default()
        };
        let layout = Layout::new(io.listener(), &config);
        Receiver::new(io, layout, &config, 0).unwrap()
    }

    /// Issue 14, defect 7: a `Copy` completion could be handed to `take_buffer` twice and
    /// yield two tokens for one buffer. Now a completion is spent taking its buffer, and a
    /// second completion naming a buffer that is still out (a kernel bug) is refused.
    #[test]
    fn a_buffer_is_taken_once() {
        let Some((io, _wake)) = io() else {
            return;
        };
        let mut r = receiver(&io);
        // IORING_CQE_F_BUFFER with buffer id 2 above IORING_CQE_BUFFER_SHIFT (16).
        let flags = 1 | (2 << 16);
        let ud = UserData::new(OpKind::Recv, 0, 0).encode();
        // SAFETY: no receive was ever armed on this ring, so the kernel selects and writes no
        // buffer of the group. The second completion names buffer 2 again on purpose.
        let (first, again) = unsafe {
            (
                Completion::forged(ud, 40, flags),
                Completion::forged(ud, 40, flags),
            )
        };
        let buf = r.take_buffer(first).expect("the buffer");
        assert_eq!(r.bufs.bytes(&buf).len(), 40);
        assert!(
            r.take_buffer(again).is_none(),
            "a second token for buffer 2"
        );
        assert_eq!(r.bufs.available(), 3);
        assert_eq!(r.bufs.refused(), 1);
        r.bufs.recycle(buf);
        assert_eq!(r.bufs.available(), 4);
    }

    /// Issue 8, finding 2: the worker freed the buffers before the ring went. Now teardown
    /// unregisters the buffers only with nothing in flight, closes the ring, and frees only
    /// what no armed operation can reach (the worker's `Drop` does these steps in this order).
    #[test]
    fn teardown_frees_buffers_only_when_nothing_is_in_flight() {
        // A receive armed and never completed: the buffers stay mapped after the drop.
        let Some((mut io, _wake)) = io() else {
            return;
        };
        let mut r = receiver(&io);
        io.arm_recv().unwrap();
        io.submit().unwrap();
        assert_eq!(io.in_flight(), 1);
        let (addr, len) = r.bufs.buffers_range();
        r.release_buffers(&io);
        drop(io);
        drop(r);
        assert!(BufRing::buffers_mapped_at(addr, len), "in flight: leaked");

        // Nothing armed: the group is unregistered, the ring closed, the buffers unmapped.
        let (io, _wake) = super::super::io::tests::io().unwrap();
        let mut r = receiver(&io);
        let (addr, len) = r.bufs.buffers_range();
        r.release_buffers(&io);
        drop(io);
        drop(r);
        assert!(!BufRing::buffers_mapped_at(addr, len), "idle: freed");
    }

    /// The receiver is a part of its own: given the completions of the ring it registered
    /// with, it counts and queues what arrived and hands it to any `Sink`, holding it (and
    /// counting backpressure once) while the sink has no reply slot.
    #[test]
    fn received_datagrams_wait_for_a_reply_slot_and_are_handed_over_once() {
        let Some((mut io, _wake)) = io() else {
            return;
        };
        let mut r = receiver(&io);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = io.listener().local_addr;
        io.arm_recv().unwrap();
        for payload in [&b"one"[..], b"two"] {
            client.send_to(payload, to).unwrap();
        }
        let mut stats = Stats::default();
        let mut completions = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.available() > 2 {
            assert!(Instant::now() < deadline, "the datagrams never arrived");
            io.submit_and_wait(1, Some(Duration::from_millis(100)))
                .unwrap();
            io.drain(&mut completions);
            for c in completions.drain(..) {
                let ud = UserData::decode(c.user_data()).unwrap();
                io.completed(ud, crate::ring::has_more(c.flags()));
                r.take(c, Source::Listener, &mut stats);
            }
        }
        let mut full = Recorder {
            slots: 0,
            seen: Vec::new(),
        };
        r.deliver(&mut full, &mut stats);
        r.deliver(&mut full, &mut stats);
        assert!(full.seen.is_empty());
        assert_eq!(r.available(), 2, "both buffers held while no slot is free");
        assert_eq!(
            stats.backpressure, 1,
            "one stretch of backpressure, counted once"
        );
        let mut sink = Recorder {
            slots: 1,
            seen: Vec::new(),
        };
        r.deliver(&mut sink, &mut stats);
        assert_eq!(sink.seen.len(), 1);
        assert!(!r.is_idle());
        assert_eq!(stats.backpressure, 2, "a new stretch");
        sink.slots = 8;
        r.deliver(&mut sink, &mut stats);
        let peer = client.local_addr().unwrap();
        assert_eq!(
            sink.seen,
            vec![(peer, b"one".to_vec()), (peer, b"two".to_vec())]
        );
        assert!(r.is_idle());
        assert_eq!(
            r.available(),
            4,
            "every buffer recycled once the sink saw it"
        );
        assert_eq!(stats.rx_datagrams, 2);
        assert_eq!(stats.backpressure, 2);
        // The multishot receive is still armed: cancel it and take its final completion
        // so the buffers can be freed.
        let recv = io.ledger().recv().unwrap();
        io.cancel(recv).unwrap();
        while io.in_flight() > 0 {
            assert!(Instant::now() < deadline, "the cancel never completed");
            io.submit_and_wait(1, Some(Duration::from_millis(100)))
                .unwrap();
            io.drain(&mut completions);
            for c in completions.drain(..) {
                let ud = UserData::decode(c.user_data()).unwrap();
                io.completed(ud, crate::ring::has_more(c.flags()));
            }
        }
        let (addr, len) = r.bufs.buffers_range();
        r.release_buffers(&io);
        drop(io);
        drop(r);
        assert!(
            !BufRing::buffers_mapped_at(addr, len),
            "freed after the drain"
        );
    }
}
