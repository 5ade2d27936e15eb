//! What a worker shares with other threads: its published counters, its wake-up eventfd and
//! its mailbox of posted work; and what all workers of one server share.
//!
//! Below both the handler API and the worker: a `SessionHandle` posts into the mailbox, the
//! worker collects from it, and neither imports the other for it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::cookie::{CookieJar, UsedCookies};
use crate::directory::Directory;
use crate::session::SessionId;
use crate::stats::SharedStats;

/// Work posted to a worker from another thread.
pub enum Posted {
    /// A reply made through a [`crate::SessionHandle`].
    DeferredReply {
        session: SessionId,
        payload: Vec<u8>,
    },
    /// A datagram another worker received for a peer this worker owns.
    ForwardedDatagram {
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: Vec<u8>,
    },
    /// Nothing to carry: the poster keeps its work in the handler's own queue (a QUIC
    /// connection's inbox, `quic::Remote`) and only needs the worker to run a turn, in which
    /// the handler's `next_timer` sees the queue. Posted through the mailbox, not written to
    /// the eventfd directly, so that a stopped worker refuses it.
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    Wake,
}

/// The mailbox and the flag that closes it, under one lock: a post either lands before the
/// worker's final collection (and is handled or counted by the worker) or sees the mailbox
/// closed and gets its work back. Nothing posted can fall between the two.
struct Mailbox {
    posted: Vec<Posted>,
    closed: bool,
}

/// What a worker shares with the other threads.
pub struct WorkerShared {
    pub counters: SharedStats,
    /// Written to wake the worker's ring from another thread.
    pub wake_fd: OwnedFd,
    pub shutdown: AtomicBool,
    /// The listener is handed over: stop receiving on it for good (`Server::release_listeners`).
    pub release: AtomicBool,
    mailbox: Mutex<Mailbox>,
}

impl WorkerShared {
    pub fn new() -> io::Result<WorkerShared> {
        Ok(WorkerShared {
            counters: SharedStats::default(),
            wake_fd: crate::sys::eventfd()?,
            shutdown: AtomicBool::new(false),
            release: AtomicBool::new(false),
            mailbox: Mutex::new(Mailbox {
                posted: Vec::new(),
                closed: false,
            }),
        })
    }

    /// Asks the worker to stop: it stops receiving, flushes replies, cancels what is in
    /// flight and returns.
    pub fn request_shutdown(&self) -> io::Result<()> {
        self.shutdown.store(true, Ordering::Release);
        crate::sys::eventfd_signal(&self.wake_fd)
    }

    /// Asks the worker to stop receiving on its listener and to end once its remaining
    /// sessions have closed.
    pub fn request_release(&self) -> io::Result<()> {
        self.release.store(true, Ordering::Release);
        crate::sys::eventfd_signal(&self.wake_fd)
    }

    /// Hands `work` to the worker and wakes it (once per batch). `Err(work)` when the worker
    /// has stopped taking work.
    pub fn post(&self, work: Posted) -> Result<(), Posted> {
        let was_empty = {
            let mut mailbox = self.mailbox.lock();
            if mailbox.closed {
                return Err(work);
            }
            let was_empty = mailbox.posted.is_empty();
            mailbox.posted.push(work);
            was_empty
        };
        // The worker empties the whole mailbox per wake-up, so only the first post of a batch
        // needs to write the eventfd.
        if was_empty {
            let _ = crate::sys::eventfd_signal(&self.wake_fd);
        }
        Ok(())
    }

    /// Moves everything posted so far into `out` (which keeps its capacity).
    pub(crate) fn collect(&self, out: &mut Vec<Posted>) {
        out.append(&mut self.mailbox.lock().posted);
    }

    /// Closes the mailbox for good and returns what was posted before it closed. Every later
    /// `post` fails.
    pub(crate) fn close(&self) -> Vec<Posted> {
        let mut mailbox = self.mailbox.lock();
        mailbox.closed = true;
        std::mem::take(&mut mailbox.posted)
    }
}

/// Everything the workers of one server share.
pub struct ServerShared {
    /// Every worker's shared part, by worker id (for forwarding between workers).
    pub workers: Vec<Arc<WorkerShared>>,
    /// Session owners, for `connected` mode with several workers.
    pub directory: Option<Directory>,
    /// Sessions open in all workers.
    pub sessions_total: Arc<AtomicUsize>,
    /// Connected per-client sockets open in all workers.
    pub connected_total: AtomicUsize,
    /// `--validate-peers`: mints and checks cookies (the same keys in every worker).
    pub cookies: Option<CookieJar>,
    /// Cookies already used to open a session (a cookie opens one session, once).
    pub used_cookies: Mutex<UsedCookies>,
    /// The common clock origin (cookie timestamps must agree between workers).
    pub started: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(n: u8) -> Posted {
        Posted::DeferredReply {
            session: SessionId {
                slot: 0,
                generation: 0,
            },
            payload: vec![n],
        }
    }

    /// Issue 8, finding 5: `post` checked the stopped flag outside the lock, so work posted
    /// between that check and the worker's final collection vanished. Now every post is
    /// either collected by `close` or refused.
    #[test]
    fn every_post_is_collected_or_refused() {
        let shared = Arc::new(WorkerShared::new().unwrap());
        let posters: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut accepted = 0u64;
                    for _ in 0..20_000 {
                        match shared.post(reply(1)) {
                            Ok(()) => accepted += 1,
                            Err(_) => break,
                        }
                    }
                    accepted
                })
            })
            .collect();
        let mut collected = 0u64;
        let mut batch = Vec::new();
        for _ in 0..50 {
            shared.collect(&mut batch);
            collected += batch.drain(..).count() as u64;
        }
        collected += shared.close().len() as u64;
        let accepted: u64 = posters.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(collected, accepted);
        assert!(shared.post(reply(2)).is_err(), "closed mailbox refuses");
    }
}
