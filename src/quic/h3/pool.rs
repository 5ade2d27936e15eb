//! The blocking pool: a few threads, shared by a server's workers, that run what may block
//! (a [`super::Handled::Blocking`] service call, a [`super::BodySource`]'s next piece) and
//! post the outcome back to the connection through its `Remote`. The worker never waits on
//! a disk.
//!
//! Bounded twice: at most [`QUEUE`] jobs wait (a job refused for want of room comes back to
//! the caller, which answers 503 or resets the stream, and counts it), and each stream has at
//! most one job and one chunk of its body in flight, so memory is `QUEUE + streams` chunks at
//! worst. The threads start with the first job, and end when the pool is dropped (the
//! server's last handler gone) after finishing the jobs already taken.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

/// Threads of a pool.
pub const THREADS: usize = 4;
/// Jobs that may wait for a thread.
pub const QUEUE: usize = 1024;

/// A job: runs on a pool thread and posts what it made to its connection (a post refused
/// because the connection closed drops the outcome: nobody is left to want it).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: VecDeque<Job>,
    stopping: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A bounded pool of blocking threads (see the module's documentation).
pub struct BlockingPool {
    inner: Arc<Inner>,
    threads: OnceLock<Vec<JoinHandle<()>>>,
    size: usize,
}

impl std::fmt::Debug for BlockingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingPool")
            .field("size", &self.size)
            .field("started", &self.threads.get().is_some())
            .finish()
    }
}

impl Default for BlockingPool {
    fn default() -> BlockingPool {
        BlockingPool::new(THREADS)
    }
}

impl BlockingPool {
    /// A pool of `size` threads (at least one), not started until its first job.
    pub fn new(size: usize) -> BlockingPool {
        BlockingPool {
            inner: Arc::new(Inner {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    stopping: false,
                }),
                ready: Condvar::new(),
            }),
            threads: OnceLock::new(),
            size: size.max(1),
        }
    }

    /// Queues `job`, or gives it back when [`QUEUE`] jobs already wait (or a thread could
    /// not be started: the pool then refuses everything, and the caller counts it).
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        let threads = self.threads.get_or_init(|| self.start());
        if threads.is_empty() {
            return Err(job);
        }
        let mut queue = self.inner.queue.lock();
        if queue.jobs.len() >= QUEUE {
            return Err(job);
        }
        queue.jobs.push_back(job);
        drop(queue);
        self.inner.ready.notify_one();
        Ok(())
    }

    fn start(&self) -> Vec<JoinHandle<()>> {
        let mut threads = Vec::with_capacity(self.size);
        for i in 0..self.size {
            let inner = self.inner.clone();
            match std::thread::Builder::new()
                .name(format!("udpring-h3-io-{i}"))
                .spawn(move || work(&inner))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::error!(
                        "HTTP/3 blocking pool: cannot start thread {i}: {e}; running with {i}"
                    );
                    break;
                }
            }
        }
        threads
    }
}

fn work(inner: &Inner) {
    loop {
        let job = {
            let mut queue = inner.queue.lock();
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.stopping {
                    return;
                }
                inner.ready.wait(&mut queue);
            }
        };
        job();
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        self.inner.queue.lock().stopping = true;
        self.inner.ready.notify_all();
        if let Some(threads) = self.threads.take() {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Jobs run on the pool's threads, a job that blocks holds up only its own thread, and
    /// a full queue gives the job back.
    #[test]
    fn jobs_run_off_the_caller_and_the_queue_is_bounded() {
        let pool = BlockingPool::new(2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        // One thread blocked until released.
        let blocked = release_rx.clone();
        assert!(pool
            .submit(Box::new(move || {
                let _ = blocked.lock().recv();
            }))
            .is_ok());
        // The other thread still runs jobs.
        let (done_tx, done_rx) = mpsc::channel();
        assert!(pool
            .submit(Box::new(move || done_tx.send(7).unwrap()))
            .is_ok());
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(7));

        // Both threads blocked: QUEUE jobs wait, the next is refused.
        let second = release_rx.clone();
        assert!(pool
            .submit(Box::new(move || {
                let _ = second.lock().recv();
            }))
            .is_ok());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pool.inner.queue.lock().jobs.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "second job never taken"
            );
            std::thread::yield_now();
        }
        for _ in 0..QUEUE {
            assert!(pool.submit(Box::new(|| {})).is_ok());
        }
        assert!(pool.submit(Box::new(|| {})).is_err());
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        // Drop joins the threads after they drain the queue.
        drop(pool);
    }
}
