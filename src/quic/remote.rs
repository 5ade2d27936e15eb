//! Reaching a connection from another thread: a [`Remote`] posts the app's messages into the
//! connection's inbox and wakes the owning worker through its mailbox
//! (`shared::Posted::Wake`), the way a `SessionHandle` does for a deferred reply.
//!
//! Why nothing is lost: the inbox's `closed` flag and its messages share one lock. The worker
//! sets the flag when the connection closes, in the same critical section in which it takes
//! what is left, and hands those messages to the app before `on_closed`. So a post either
//! lands before that moment (and reaches `App::on_message`) or sees the flag and gets its
//! message back (`PostError`). A worker that has stopped refuses the wake-up, and the post
//! gets its message back too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;

use parking_lot::Mutex;

use super::conn::ConnId;
use crate::shared::{Posted, WorkerShared};

/// Why a post was refused; its message comes back in the [`PostError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostRefusal {
    /// The connection has closed.
    ConnectionClosed,
    /// The worker has stopped (shutdown) or never ran.
    WorkerStopped,
}

/// A refused post: the message, given back, and why.
pub struct PostError<M> {
    /// The message that was not delivered.
    pub message: M,
    /// Why.
    pub reason: PostRefusal,
}

impl<M> PostError<M> {
    /// The message that was not delivered.
    pub fn into_message(self) -> M {
        self.message
    }
}

impl<M> std::fmt::Debug for PostError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostError")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl<M> std::fmt::Display for PostError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.reason {
            PostRefusal::ConnectionClosed => "the QUIC connection has closed",
            PostRefusal::WorkerStopped => "the QUIC connection's worker has stopped",
        })
    }
}

impl<M> std::error::Error for PostError<M> {}

struct InboxState<M> {
    messages: Vec<M>,
    closed: bool,
    /// On the worker's ready list (set by the post that put it there, cleared by the worker
    /// when it takes the messages).
    queued: bool,
}

/// One connection's posted messages.
pub(super) struct Inbox<M> {
    state: Mutex<InboxState<M>>,
    /// The connection's slot in its worker's table.
    pub slot: usize,
}

impl<M> Inbox<M> {
    pub fn new(slot: usize) -> Inbox<M> {
        Inbox {
            state: Mutex::new(InboxState {
                messages: Vec::new(),
                closed: false,
                queued: false,
            }),
            slot,
        }
    }

    /// The worker takes what was posted (in order) into `out`.
    pub fn take(&self, out: &mut Vec<M>) {
        let mut state = self.state.lock();
        state.queued = false;
        out.append(&mut state.messages);
    }

    /// The connection closed: later posts are refused; what was posted before goes to
    /// `out`, for the app.
    pub fn close(&self, out: &mut Vec<M>) {
        let mut state = self.state.lock();
        state.closed = true;
        out.append(&mut state.messages);
    }

    fn is_closed(&self) -> bool {
        self.state.lock().closed
    }
}

/// One worker's connections with posted messages, and how to wake the worker.
pub(super) struct ReadyList<M> {
    queue: Mutex<Vec<Arc<Inbox<M>>>>,
    /// `queue` is not empty: read by the handler's `next_timer` without the lock.
    pending: AtomicBool,
    /// The worker's mailbox and thread, learnt from its first callback.
    worker: OnceLock<(Arc<WorkerShared>, ThreadId)>,
}

impl<M> ReadyList<M> {
    pub fn new() -> ReadyList<M> {
        ReadyList {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            worker: OnceLock::new(),
        }
    }

    /// Records the worker (idempotent); called from the worker's thread.
    pub fn set_worker(&self, shared: &Arc<WorkerShared>) {
        if self.worker.get().is_none() {
            let _ = self
                .worker
                .set((shared.clone(), std::thread::current().id()));
        }
    }

    /// Messages wait: the worker should run its handler's timer now.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// The inboxes with messages, in the order they were first posted to.
    pub fn take(&self, out: &mut Vec<Arc<Inbox<M>>>) {
        let mut queue = self.queue.lock();
        self.pending.store(false, Ordering::Release);
        out.append(&mut queue);
    }

    /// Puts `inbox` on the list and wakes the worker if the list was empty. From the
    /// worker's own thread no wake-up is needed: the handler's `next_timer` sees the list at
    /// the end of the turn.
    fn schedule(&self, inbox: &Arc<Inbox<M>>) -> Result<(), PostRefusal> {
        let Some((shared, thread)) = self.worker.get() else {
            return Err(PostRefusal::WorkerStopped);
        };
        let was_empty = {
            let mut queue = self.queue.lock();
            let was_empty = queue.is_empty();
            queue.push(inbox.clone());
            self.pending.store(true, Ordering::Release);
            was_empty
        };
        if was_empty && std::thread::current().id() != *thread && shared.post(Posted::Wake).is_err()
        {
            return Err(PostRefusal::WorkerStopped);
        }
        Ok(())
    }
}

/// A thread-safe handle to one connection (`Send + Sync + Clone`): posts the app's
/// [`super::App::Message`]s to it, from any thread, without blocking on the worker. Made by
/// [`super::Connection::remote`].
pub struct Remote<M> {
    inbox: Arc<Inbox<M>>,
    ready: Arc<ReadyList<M>>,
    id: ConnId,
}

impl<M> Clone for Remote<M> {
    fn clone(&self) -> Remote<M> {
        Remote {
            inbox: self.inbox.clone(),
            ready: self.ready.clone(),
            id: self.id,
        }
    }
}

impl<M> std::fmt::Debug for Remote<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("id", &self.id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl<M> Remote<M> {
    pub(super) fn new(inbox: Arc<Inbox<M>>, ready: Arc<ReadyList<M>>, id: ConnId) -> Remote<M> {
        Remote { inbox, ready, id }
    }

    /// The connection this handle reaches.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Hands `message` to the connection's [`super::App::on_message`] on its worker, waking
    /// the worker. Refused, with the message given back, when the connection has closed or
    /// the worker has stopped; once accepted, the app gets it exactly once (see
    /// [`super::App::on_message`]).
    pub fn post(&self, message: M) -> Result<(), PostError<M>> {
        let mut state = self.inbox.state.lock();
        if state.closed {
            return Err(PostError {
                message,
                reason: PostRefusal::ConnectionClosed,
            });
        }
        if !state.queued {
            // Under the inbox's lock: the worker cannot take this inbox's messages (or close
            // it) until the message below is in.
            if let Err(reason) = self.ready.schedule(&self.inbox) {
                return Err(PostError { message, reason });
            }
            state.queued = true;
        }
        state.messages.push(message);
        Ok(())
    }

    /// Whether the connection has closed (a later `post` is refused).
    pub fn is_closed(&self) -> bool {
        self.inbox.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> (Arc<ReadyList<u32>>, Arc<WorkerShared>) {
        let shared = Arc::new(WorkerShared::new().unwrap());
        let ready = Arc::new(ReadyList::new());
        // Recorded from this thread; posts below come from others, so they wake.
        ready.set_worker(&shared);
        (ready, shared)
    }

    /// Every post from other threads is either taken by the worker or given back by the
    /// close, never lost: the count the posters had accepted equals what the worker took.
    #[test]
    fn every_post_is_delivered_or_given_back() {
        let (ready, shared) = list();
        let inbox = Arc::new(Inbox::new(0));
        let remote = Remote::new(inbox.clone(), ready.clone(), ConnId(0));
        let posters: Vec<_> = (0..4)
            .map(|_| {
                let remote = remote.clone();
                std::thread::spawn(move || {
                    let (mut accepted, mut refused) = (0u64, 0u64);
                    for n in 0..20_000 {
                        match remote.post(n) {
                            Ok(()) => accepted += 1,
                            Err(e) => {
                                assert_eq!(e.reason, PostRefusal::ConnectionClosed);
                                assert_eq!(e.into_message(), n, "the message comes back");
                                refused += 1;
                            }
                        }
                    }
                    (accepted, refused)
                })
            })
            .collect();
        let (mut taken, mut inboxes, mut wakes) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..200 {
            ready.take(&mut inboxes);
            for inbox in inboxes.drain(..) {
                inbox.take(&mut taken);
            }
            shared.collect(&mut wakes);
        }
        inbox.close(&mut taken);
        let (accepted, refused) = posters
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert_eq!(taken.len() as u64, accepted);
        assert_eq!(accepted + refused, 80_000);
        assert!(remote.is_closed());
        assert!(remote.post(1).is_err(), "closed inbox refuses");
    }

    #[test]
    fn a_stopped_worker_gives_the_message_back() {
        let (ready, shared) = list();
        let remote = Remote::new(Arc::new(Inbox::new(0)), ready, ConnId(1));
        let _ = shared.close();
        let back = std::thread::spawn(move || remote.post(7)).join().unwrap();
        let err = back.expect_err("refused");
        assert_eq!(err.reason, PostRefusal::WorkerStopped);
        assert_eq!(err.message, 7);
    }

    #[test]
    fn posts_from_the_worker_thread_do_not_wake_it() {
        let (ready, shared) = list();
        let remote = Remote::new(Arc::new(Inbox::new(0)), ready.clone(), ConnId(2));
        remote.post(1).unwrap();
        remote.post(2).unwrap();
        let mut wakes = Vec::new();
        shared.collect(&mut wakes);
        assert!(wakes.is_empty());
        assert!(ready.pending(), "the handler's next_timer sees it");
    }
}
