//! The sender: the worker's pool of reply slots, the `Reply`s handlers answer through, the
//! push of the turn's replies to the ring (`flush`, once per turn) and what their completions
//! say (sent, failed, or a kernel that refuses GSO trains).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use super::io::Io;
use super::log_limit::LogLimit;
use crate::config::ServerConfig;
use crate::handler::{Reply, SessionCtx};
use crate::op::UserData;
use crate::ring::Completion;
use crate::send_pool::{send_errno, Dest, GsoEvidence, SendError, SendPool};
use crate::shared::WorkerShared;
use crate::stats::Stats;

pub(super) struct Sender {
    pool: SendPool,
    /// The listening socket: replies without a socket of their own leave from it.
    listener_fd: RawFd,
    log: LogLimit,
    worker: usize,
    /// The worker's mailbox, lent to every `Reply` (a handler's wake-ups from other threads).
    shared: Arc<WorkerShared>,
}

impl Sender {
    /// A pool of `--send-slots` slots of `--max-datagram` bytes for the listener `io` owns.
    pub fn new(
        config: &ServerConfig,
        io: &Io,
        worker: usize,
        shared: Arc<WorkerShared>,
    ) -> io::Result<Sender> {
        let listener_fd = io.listener_fd();
        let mut pool = SendPool::new(
            config.send_slots,
            config.max_datagram,
            io.listener().is_v6,
            config.gso,
        )?;
        if let Some(slot) = io.listener_slot() {
            pool.use_fixed_file(listener_fd, slot);
        }
        Ok(Sender {
            pool,
            listener_fd,
            log: LogLimit::new(),
            worker,
            shared,
        })
    }

    /// Slots a reply can still take this turn.
    #[inline]
    pub fn free_slots(&self) -> usize {
        self.pool.free_slots()
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener_fd
    }

    /// A reply to a datagram, aimed at `dest`, for `session` (if any), charged to `budget`
    /// (an unvalidated peer's anti-amplification allowance; `None`: no limit).
    #[inline]
    pub fn reply<'a>(
        &'a mut self,
        counters: &'a mut Stats,
        dest: Dest,
        session: Option<SessionCtx<'a>>,
        budget: Option<&'a mut u64>,
    ) -> Reply<'a> {
        Reply {
            pool: &mut self.pool,
            counters,
            dest,
            listener_fd: self.listener_fd,
            session,
            budget,
            worker: Some(&self.shared),
        }
    }

    /// A reply with no datagram to answer (the handler's timer, shutdown).
    pub fn unaddressed<'a>(&'a mut self, counters: &'a mut Stats) -> Reply<'a> {
        let mut reply = Reply::unaddressed(&mut self.pool, counters, self.listener_fd);
        reply.worker = Some(&self.shared);
        reply
    }

    /// Queues a copy of `bytes` for `dest` (a Retry, a deferred reply).
    pub fn queue_bytes(&mut self, dest: Dest, bytes: &[u8]) -> Result<usize, SendError> {
        self.pool.queue_bytes(dest, bytes)
    }

    /// A send completion: frees its slots and counts what it carried, or the error.
    pub fn complete(&mut self, ud: UserData, c: &Completion, stats: &mut Stats) {
        let done = self.pool.complete(ud);
        // What the completion says about GSO is the pool's decision (`gso_evidence`): EIO to a
        // train turns it off, EINVAL to a train holds trains to that destination only.
        let evidence = done.map(|done| (done, self.pool.gso_evidence(&done, c.result())));
        match evidence {
            None => stats.stale_completions += 1,
            Some((done, evidence)) if c.result() < 0 => {
                stats.send_errors += u64::from(done.segments);
                let error = send_errno(c.result());
                match evidence {
                    GsoEvidence::Disabled => {
                        stats.gso_refused += 1;
                        tracing::warn!(worker = self.worker, %error, "UDP GSO refused; sending datagrams one by one");
                    }
                    GsoEvidence::DestinationHeld => {
                        stats.gso_refused += 1;
                        if let Some(held_back) = self.log.check() {
                            tracing::warn!(worker = self.worker, %error, peer = %done.dest.peer, held_back, "GSO train refused; sending to this peer one by one until a datagram goes through");
                        }
                    }
                    GsoEvidence::RefusedWhileOff => stats.gso_refused += 1,
                    _ => {
                        if let Some(held_back) = self.log.check() {
                            tracing::warn!(worker = self.worker, %error, held_back, "send failed");
                        }
                    }
                }
            }
            Some((done, _)) => {
                stats.tx_datagrams += u64::from(done.segments);
                stats.tx_bytes += c.result() as u64;
                if done.segments > 1 {
                    stats.gso_trains += 1;
                }
            }
        }
    }

    /// Pushes the turn's replies to the ring (recorded in `io`'s ledger); they reach the
    /// kernel with the next wait.
    pub fn flush(&mut self, io: &mut Io, stats: &mut Stats) {
        if let Err(e) = self.pool.flush(io) {
            // The submission queue could not take them (the completion queue is overflowing):
            // the replies are dropped and counted; UDP peers retransmit.
            stats.send_dropped += e.dropped;
            if let Some(held_back) = self.log.check() {
                tracing::warn!(worker = self.worker, error = %e.error, dropped = e.dropped, held_back, "replies dropped: submission failed");
            }
        }
    }
}
