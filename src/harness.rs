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
    ///
    /// # Panics
    /// When the sizes are out of range ([`Harness::try_new`] says why), before anything is
    /// allocated.
    pub fn new(max_len: usize, slots: usize) -> Harness {
        Harness::try_new(max_len, slots).unwrap_or_else(|e| panic!("Harness::new: {e}"))
    }

    /// [`Harness::new`], or `InvalidInput` for more than 131,072 slots or replies longer than
    /// 65,536 bytes (the engine's own limits are smaller: `--send-slots`, `--max-datagram`).
    /// Checked before anything is allocated.
    pub fn try_new(max_len: usize, slots: usize) -> std::io::Result<Harness> {
        Ok(Harness {
            pool: SendPool::new(slots, max_len, true, false)?,
            counters: Stats::default(),
        })
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
            worker: None,
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
            worker: None,
        };
        handler.on_timer(now, &mut reply);
        self.pool.take_queued(on_reply);
    }

    /// What the handler counted (`bad_input`, `send_dropped`, ...).
    pub fn counters(&self) -> &Stats {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::Echo;

    /// Issue 14, defect 1: `Harness::new(1 << 63, 2)` multiplied without a check; in a release
    /// build the pool allocated 0 bytes and `deliver` wrote through a 2^63-byte slice. Now the
    /// sizes are checked before anything is allocated (not by the debug overflow check).
    #[test]
    #[should_panic(expected = "Harness::new: send pool")]
    fn a_harness_with_sizes_that_overflow_is_refused() {
        let mut harness = Harness::new(1 << 63, 2);
        let datagram = Datagram::new(SocketAddr::from(([127, 0, 0, 1], 9)), b"hello");
        harness.deliver(&mut Echo, &datagram, |_, _| {});
    }

    #[test]
    fn try_new_says_which_size_is_out_of_range() {
        for (max_len, slots) in [(1 << 63, 2), (usize::MAX, usize::MAX), (64, usize::MAX)] {
            let err = Harness::try_new(max_len, slots).err().expect("refused");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("at most"), "{err}");
        }
        let mut harness = Harness::try_new(1500, 4).expect("in range");
        let datagram = Datagram::new(SocketAddr::from(([127, 0, 0, 1], 9)), b"hello");
        let mut echoed = Vec::new();
        harness.deliver(&mut Echo, &datagram, |_, bytes| echoed.push(bytes.to_vec()));
        assert_eq!(echoed, [b"hello".to_vec()]);
    }
}
