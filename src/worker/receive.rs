//! From a receive completion to the handler: the backlog of received datagrams (each holding
//! its buffer until the handler has seen it), parsing, counting, routing, and the handler
//! call with a `Reply` aimed at the right socket and bounded by the peer's
//! anti-amplification budget.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::router::{Route, Source};
use super::Worker;
use crate::buf_ring::{BufRing, RecvBuf};
use crate::config::SessionMode;
use crate::datagram::{
    decode_sockaddr, find_ecn, find_gro_segment_size, find_pktinfo, parse_recvmsg_out,
};
use crate::handler::{Datagram, Reply, SessionCtx, SessionHandler};
use crate::ring::Completion;
use crate::send_pool::Dest;
use crate::session::{CloseReason, SessionId};

/// A datagram waiting for the handler.
pub(super) enum Pending {
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

/// Where the payload of the datagram being delivered is.
#[derive(Clone, Copy)]
enum Bytes<'a> {
    Buffer(&'a RecvBuf, usize, usize),
    Owned(&'a [u8]),
}

impl<'a> Bytes<'a> {
    fn range(at: Range<usize>, buf: &'a RecvBuf) -> Bytes<'a> {
        Bytes::Buffer(buf, at.start, at.end)
    }

    /// The payload, read from `bufs` for a buffered datagram. A free function of the ring
    /// (not a `Worker` method) so that the worker's other fields stay free to borrow.
    fn view(self, bufs: &'a BufRing) -> &'a [u8] {
        match self {
            Bytes::Buffer(buf, start, end) => &bufs.bytes(buf)[start..end],
            Bytes::Owned(v) => v,
        }
    }
}

impl<H: SessionHandler> Worker<H> {
    /// Queues a receive completion's datagram for the handler, or counts its error.
    pub(super) fn take_received(&mut self, c: Completion, source: Source) {
        let result = c.result();
        if result >= 0 {
            match self.io.take_buffer(c) {
                // Never grows past the buffer count: each pending entry holds a buffer.
                Some(buf) => self.backlog.push_back(Pending::Buffer {
                    buf,
                    source,
                    delivered: 0,
                }),
                None => self.stats.malformed += 1,
            }
            return;
        }
        match -result {
            // The ring ran dry: the multishot request ended. It is armed again at the end of
            // the turn, once the handler has returned buffers.
            libc::ENOBUFS => self.stats.enobufs += 1,
            libc::ECANCELED => {}
            errno => {
                self.stats.recv_errors += 1;
                if let Some(held_back) = self.recv_log.check() {
                    tracing::warn!(worker = self.id, error = %std::io::Error::from_raw_os_error(errno), held_back, "receive failed");
                }
            }
        }
    }

    /// Hands pending datagrams to the handler while a reply slot is free. With every slot in
    /// flight it stops: the buffers stay held, the kernel runs out of them and stops
    /// delivering (ENOBUFS), and datagrams wait in the socket's queue instead of in memory
    /// we would have to grow.
    pub(super) fn process_backlog(&mut self) {
        while !self.backlog.is_empty() {
            if self.io.sends.free_slots() == 0 {
                self.note_backpressure();
                return;
            }
            self.backpressured = false;
            match self.backlog.pop_front() {
                Some(Pending::Buffer {
                    buf,
                    source,
                    mut delivered,
                }) => {
                    if self.handle_buffer(&buf, source, &mut delivered) {
                        self.io.bufs.recycle(buf);
                    } else {
                        // Out of reply slots in the middle of a GRO train: resume later.
                        self.backlog.push_front(Pending::Buffer {
                            buf,
                            source,
                            delivered,
                        });
                        self.note_backpressure();
                        return;
                    }
                }
                Some(Pending::Owned {
                    peer,
                    local,
                    payload,
                    source,
                }) => self.route(source, peer, local, 0, Bytes::Owned(&payload), None),
                None => return,
            }
        }
    }

    fn note_backpressure(&mut self) {
        if !self.backpressured {
            self.backpressured = true;
            self.stats.backpressure += 1;
        }
    }

    /// Parses one received buffer, counts it and routes its datagram, or the datagrams of a
    /// GRO train from number `delivered` on. Returns `false` when it stopped in the middle of
    /// a train because no reply slot is free (`delivered` then says where to resume).
    fn handle_buffer(&mut self, buf: &RecvBuf, source: Source, delivered: &mut u16) -> bool {
        let bytes = self.io.bufs.bytes(buf);
        let (peer, local, ecn, at, segment) =
            match parse_recvmsg_out(bytes, self.name_space, self.control_space) {
                Ok(out) if out.is_truncated() => {
                    self.stats.truncated += 1;
                    return true;
                }
                Ok(out) => {
                    let Ok(peer) = decode_sockaddr(out.name) else {
                        self.stats.malformed += 1;
                        return true;
                    };
                    let local = if self.socket.wants_pktinfo && source == Source::Listener {
                        find_pktinfo(out.control)
                    } else {
                        None
                    };
                    let segment = find_gro_segment_size(out.control).map(usize::from);
                    let ecn = if self.ecn { find_ecn(out.control) } else { 0 };
                    // Where the payload sits in the buffer, so the borrow of `bytes` can end.
                    let start = out.payload.as_ptr() as usize - bytes.as_ptr() as usize;
                    (peer, local, ecn, start..start + out.payload.len(), segment)
                }
                Err(_) => {
                    self.stats.malformed += 1;
                    return true;
                }
            };
        // A "train" of one datagram is a plain receive.
        let segment = segment.filter(|&s| s < at.len());
        if *delivered == 0 {
            let count = segment.map_or(1, |s| at.len().div_ceil(s));
            if segment.unwrap_or(at.len()) > self.max_datagram {
                self.stats.truncated += count as u64;
                return true;
            }
            self.stats.rx_datagrams += count as u64;
            self.stats.rx_bytes += at.len() as u64;
            if count > 1 {
                self.stats.gro_trains += 1;
            }
        }
        let Some(segment) = segment else {
            self.route(source, peer, local, ecn, Bytes::range(at, buf), None);
            return true;
        };
        if H::WHOLE_TRAINS {
            self.route(
                source,
                peer,
                local,
                ecn,
                Bytes::range(at, buf),
                Some(segment),
            );
            return true;
        }
        let mut start = at.start + usize::from(*delivered) * segment;
        while start < at.end {
            if *delivered > 0 && self.io.sends.free_slots() == 0 {
                return false;
            }
            let end = (start + segment).min(at.end);
            let bytes = Bytes::Buffer(buf, start, end);
            self.route(source, peer, local, ecn, bytes, None);
            *delivered += 1;
            start = end;
        }
        true
    }

    /// Routes one datagram (see `router`) and carries the decision out.
    fn route(
        &mut self,
        source: Source,
        peer: SocketAddr,
        local: Option<IpAddr>,
        ecn: u8,
        bytes: Bytes,
        train: Option<usize>,
    ) {
        if self.mode == SessionMode::None {
            if source != Source::Forwarded {
                self.deliver_stateless(peer, local, ecn, bytes, train);
            }
            return;
        }
        let payload = bytes.view(&self.io.bufs);
        let received = payload.len();
        match self.router.route(
            source,
            peer,
            payload,
            self.now_ms,
            &self.server,
            &mut self.stats,
        ) {
            Route::Session { id, strip } => {
                self.deliver_to_session(id, (peer, local, ecn), bytes, strip, train)
            }
            Route::Open { validated, strip } => match self.open_session(peer, local, validated) {
                Some(id) => self.deliver_to_session(id, (peer, local, ecn), bytes, strip, train),
                None => self.router.abandon(peer, &self.server),
            },
            Route::Forward(owner) => {
                let payload = bytes.view(&self.io.bufs).to_vec();
                let work = super::Posted::ForwardedDatagram {
                    peer,
                    local,
                    payload,
                };
                match self.server.workers.get(owner).map(|w| w.post(work)) {
                    Some(Ok(())) => self.stats.forwarded += 1,
                    _ => self.stats.deferred_dropped += 1,
                }
            }
            Route::Retry => self.send_retry(peer, local, received),
            Route::Drop => {}
        }
    }

    fn deliver_stateless(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        ecn: u8,
        bytes: Bytes,
        train: Option<usize>,
    ) {
        let payload = bytes.view(&self.io.bufs);
        let Some(state) = self.stateless.as_mut() else {
            // Closed at shutdown: no handler state is left to take it.
            self.stats.shutdown_dropped += 1;
            return;
        };
        // No per-peer state here: the anti-amplification budget is per datagram.
        let mut budget = self.amplification_factor * payload.len() as u64;
        let datagram = Datagram {
            peer,
            local,
            payload,
            worker: self.id,
            ecn,
        };
        let mut reply = Reply {
            pool: &mut self.io.sends,
            counters: &mut self.stats,
            dest: Dest {
                fd: self.fd,
                peer,
                local,
                connected: false,
            },
            listener_fd: self.fd,
            session: None,
            budget: (self.amplification_factor > 0).then_some(&mut budget),
        };
        match train {
            Some(segment) => self
                .handler
                .session_train(state, &datagram, segment, &mut reply),
            None => self.handler.session_datagram(state, &datagram, &mut reply),
        }
    }

    /// Calls the handler for session `id` with the payload past its first `strip` bytes;
    /// closes the session afterwards if the handler asked to.
    fn deliver_to_session(
        &mut self,
        id: SessionId,
        (peer, local, ecn): (SocketAddr, Option<IpAddr>, u8),
        bytes: Bytes,
        strip: usize,
        train: Option<usize>,
    ) {
        let payload = bytes.view(&self.io.bufs);
        let payload = &payload[strip.min(payload.len())..];
        let now = self.now_ms;
        let Some(entry) = self.router.sessions.get_mut(id) else {
            return;
        };
        entry.last_active = now;
        let session = &mut entry.value;
        let dest = session.dest(entry.peer, self.fd, local);
        let limited = !session.validated && self.amplification_factor > 0;
        if limited {
            session.budget = session
                .budget
                .saturating_add(self.amplification_factor * payload.len() as u64);
        }
        let datagram = Datagram {
            peer,
            local,
            payload,
            worker: self.id,
            ecn,
        };
        let Some(state) = session.state.as_mut() else {
            return;
        };
        let mut reply = Reply {
            pool: &mut self.io.sends,
            counters: &mut self.stats,
            dest,
            listener_fd: self.fd,
            session: Some(SessionCtx {
                id,
                worker: &self.shared,
                closed: &mut session.closed,
                close_requested: false,
            }),
            budget: if limited {
                Some(&mut session.budget)
            } else {
                None
            },
        };
        match train {
            Some(segment) => self
                .handler
                .session_train(state, &datagram, segment, &mut reply),
            None => self.handler.session_datagram(state, &datagram, &mut reply),
        }
        let close = reply.session.is_some_and(|s| s.close_requested);
        if close {
            // Only queues the socket for closing: nothing is routed from here.
            self.close_session(id, CloseReason::HandlerClosed);
        }
    }

    /// Whether the worker still opens sessions (also after its listener was released: a
    /// datagram it received before that still gets its session here).
    /// While draining, datagrams received before the listener's receive ended still open
    /// sessions (and are answered) until the sessions are closed.
    pub(super) fn running(&self) -> bool {
        self.serving() || !self.sessions_closed
    }
}
