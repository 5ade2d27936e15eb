//! Driving a handler without sockets or a ring (sans-IO): for unit tests of handlers and for
//! benchmarking the dispatch path.

use std::net::SocketAddr;
use std::time::Instant;

use crate::handler::{Datagram, Handler, Reply};
use crate::send_pool::{Dest, SendPool};
use crate::stats::Stats;

/// Drives a handler without sockets or a ring: hand it datagrams, collect its replies. For
/// unit-testing handlers (sans-IO) and for benchmarking the dispatch path.
pub struct Harness {
    pool: SendPool,
    counters: Stats,
}

impl Harness {
    /// Replies up to `max_len` bytes, at most `slots` per datagram, as from a dual-stack IPv6
    /// socket (peers of both families can be answered).
    pub fn new(max_len: usize, slots: usize) -> Harness {
        Harness {
            pool: SendPool::new(slots, max_len, true, false),
            counters: Stats::default(),
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
            dest: Dest {
                fd: -1,
                peer: datagram.peer,
                local: datagram.local,
                connected: false,
            },
            listener_fd: -1,
            session: None,
            budget: None,
        };
        handler.on_datagram(datagram, &mut reply);
        self.pool.take_queued(on_reply);
    }

    /// Calls the handler's timer once, as the worker does when its `next_timer` has come;
    /// `on_reply` sees each reply it made, in order.
    pub fn fire_timer<H: Handler>(
        &mut self,
        handler: &mut H,
        now: Instant,
        on_reply: impl FnMut(SocketAddr, &[u8]),
    ) {
        let mut reply = Reply {
            pool: &mut self.pool,
            counters: &mut self.counters,
            dest: Dest {
                fd: -1,
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                local: None,
                connected: false,
            },
            listener_fd: -1,
            session: None,
            budget: None,
        };
        handler.on_timer(now, &mut reply);
        self.pool.take_queued(on_reply);
    }

    /// What the handler counted (`bad_input`, `send_dropped`, ...).
    pub fn counters(&self) -> &Stats {
        &self.counters
    }
}
