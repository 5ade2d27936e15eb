//! From a received buffer to the handler: parse, count, route, and call the handler with a
//! `Reply` aimed at the right socket and bounded by the peer's anti-amplification budget.

use std::net::{IpAddr, SocketAddr};

use super::{Source, Worker};
use crate::buf_ring::BufRing;
use crate::config::SessionMode;
use crate::datagram::{decode_sockaddr, find_pktinfo, parse_recvmsg_out};
use crate::handler::{Datagram, Reply, SessionCtx, SessionHandler};
use crate::send_pool::Dest;
use crate::session::SessionId;

use super::Pending;

impl<H: SessionHandler> Worker<H> {
    /// Hands pending datagrams to the handler while a reply slot is free. With every slot in
    /// flight it stops: the buffers stay held, the kernel runs out of them and stops
    /// delivering (ENOBUFS), and datagrams wait in the socket's queue instead of in memory
    /// we would have to grow.
    pub(super) fn process_backlog(&mut self) {
        while let Some(&pending) = self.backlog.front() {
            if self.sends.free_slots() == 0 {
                if !self.backpressured {
                    self.backpressured = true;
                    self.counters.backpressure += 1;
                }
                return;
            }
            self.backpressured = false;
            self.backlog.pop_front();
            self.handle(pending);
            self.bufs.recycle(pending.bid);
        }
    }

    /// Parses one received buffer and routes its datagram.
    fn handle(&mut self, pending: Pending) {
        let buf = self.bufs.buffer(pending.bid, pending.len);
        let (peer, local, payload_at, payload_len) =
            match parse_recvmsg_out(buf, self.name_space, self.control_space) {
                Ok(out) if out.is_truncated() => {
                    self.counters.truncated += 1;
                    return;
                }
                Ok(out) => {
                    let Ok(peer) = decode_sockaddr(out.name) else {
                        self.counters.malformed += 1;
                        return;
                    };
                    let local = if self.socket.wants_pktinfo && pending.source == Source::Listener {
                        find_pktinfo(out.control)
                    } else {
                        None
                    };
                    // Where the payload sits in the buffer, so the borrow can end here.
                    let at = out.payload.as_ptr() as usize - buf.as_ptr() as usize;
                    (peer, local, at, out.payload.len())
                }
                Err(_) => {
                    self.counters.malformed += 1;
                    return;
                }
            };
        self.counters.rx_datagrams += 1;
        self.counters.rx_bytes += payload_len as u64;
        let payload = Payload::Buffer {
            bid: pending.bid,
            len: pending.len,
            at: payload_at,
            payload_len,
        };
        match self.mode {
            SessionMode::None => self.deliver_stateless(peer, local, payload),
            _ => self.route(pending.source, peer, local, payload),
        }
    }

    fn deliver_stateless(&mut self, peer: SocketAddr, local: Option<IpAddr>, payload: Payload) {
        let Some(state) = self.stateless.as_mut() else {
            return; // closed at shutdown
        };
        let payload = payload.bytes(&self.bufs);
        // No per-peer state here: the anti-amplification budget is per datagram.
        let mut budget = self.amplification_factor * payload.len() as u64;
        let datagram = Datagram {
            peer,
            local,
            payload,
            worker: self.id,
        };
        let mut reply = Reply {
            pool: &mut self.sends,
            counters: &mut self.counters,
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
        self.handler.session_datagram(state, &datagram, &mut reply);
    }

    /// Calls the handler for session `id` with `payload`; closes the session afterwards if the
    /// handler asked to.
    pub(super) fn deliver_to_session(
        &mut self,
        id: SessionId,
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: Payload,
    ) {
        let now = self.now_ms;
        let Some(entry) = self.sessions.get_mut(id) else {
            return;
        };
        entry.last_active = now;
        let live = &mut entry.value;
        let dest = live.dest(entry.peer, self.fd, local);
        let payload = payload.bytes(&self.bufs);
        let limited = !live.validated && self.amplification_factor > 0;
        if limited {
            live.budget = live
                .budget
                .saturating_add(self.amplification_factor * payload.len() as u64);
        }
        let datagram = Datagram {
            peer,
            local,
            payload,
            worker: self.id,
        };
        let mut reply = Reply {
            pool: &mut self.sends,
            counters: &mut self.counters,
            dest,
            listener_fd: self.fd,
            session: Some(SessionCtx {
                id,
                worker: &self.shared,
                closed: &mut live.closed,
                close_requested: false,
            }),
            budget: if limited {
                Some(&mut live.budget)
            } else {
                None
            },
        };
        let Some(state) = live.state.as_mut() else {
            return;
        };
        self.handler.session_datagram(state, &datagram, &mut reply);
        let close = reply.session.map(|s| s.close_requested).unwrap_or(false);
        if close {
            self.close_session(id, crate::session::CloseReason::HandlerClosed);
        }
    }
}

/// A datagram's payload: in a receive buffer (the usual case) or in a letter forwarded from
/// another worker.
pub(super) enum Payload {
    Buffer {
        bid: u16,
        len: usize,
        at: usize,
        payload_len: usize,
    },
    Owned(Vec<u8>),
}

impl Payload {
    pub(super) fn bytes<'a>(&'a self, bufs: &'a BufRing) -> &'a [u8] {
        match self {
            Payload::Buffer {
                bid,
                len,
                at,
                payload_len,
            } => &bufs.buffer(*bid, *len)[*at..*at + *payload_len],
            Payload::Owned(v) => v,
        }
    }

    /// Drops the first `n` bytes (a cookie prefix).
    pub(super) fn strip(&mut self, n: usize) {
        match self {
            Payload::Buffer {
                at, payload_len, ..
            } => {
                let n = n.min(*payload_len);
                *at += n;
                *payload_len -= n;
            }
            Payload::Owned(v) => {
                v.drain(..n.min(v.len()));
            }
        }
    }

    /// A copy, for handing the datagram to another worker.
    pub(super) fn to_vec(&self, bufs: &BufRing) -> Vec<u8> {
        self.bytes(bufs).to_vec()
    }
}
