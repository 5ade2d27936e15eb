//! A worker's life: running, released (its listener handed over), draining, done. The state
//! machine and its rules; the loop (`worker/mod.rs`) asks it what the worker may do and
//! carries the transitions out (cancels, closing sessions, the handler's goodbyes).
//!
//! Release (issue 11): the listener is handed over to another process. The two processes
//! hold the same socket, so the datagrams queued on it move with it: this worker only has to
//! stop receiving on it (cancel the multishot receive, never arm it again), answer what that
//! receive already took (every completion up to its final one is in the backlog), and keep
//! serving the sessions that have sockets of their own (`connected`, `port-per-client`) until
//! they close. Their peers' datagrams keep reaching those sockets, and so this process's
//! state, while new peers reach the listener and the new process. With nothing of that kind
//! left (always in `none` and `shared` mode) the worker drains and ends.
//!
//! Drain (shutdown): the listener's receive, the idle timer and the handler's timer are
//! cancelled; sessions stay open until the receive's last completion has been answered, then
//! the handler says goodbye (`on_shutdown`) and every session closes; the worker ends when
//! nothing is in flight, or at the shutdown timeout.

use std::time::{Duration, Instant};

use crate::config::ServerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The listener was handed over: sessions with sockets of their own are still served,
    /// nothing new arrives through the listener.
    Released,
    Draining {
        deadline: Instant,
    },
}

pub(super) struct Lifecycle {
    state: State,
    /// Shutdown has closed every session (after answering what was received).
    sessions_closed: bool,
    shutdown_timeout: Duration,
    worker: usize,
}

impl Lifecycle {
    pub fn new(config: &ServerConfig, worker: usize) -> Lifecycle {
        Lifecycle {
            state: State::Running,
            sessions_closed: false,
            shutdown_timeout: config.shutdown_timeout,
            worker,
        }
    }

    /// Whether the worker still serves: running, or running without its listener.
    pub fn serving(&self) -> bool {
        !matches!(self.state, State::Draining { .. })
    }

    /// Whether the worker receives on its listener.
    pub fn receiving(&self) -> bool {
        self.state == State::Running
    }

    /// Whether the listener was handed over and the worker not yet draining.
    pub fn released(&self) -> bool {
        self.state == State::Released
    }

    /// Whether the worker still opens sessions (also after its listener was released: a
    /// datagram it received before that still gets its session here). While draining,
    /// datagrams received before the listener's receive ended still open sessions (and are
    /// answered) until the sessions are closed.
    pub fn opens_sessions(&self) -> bool {
        self.serving() || !self.sessions_closed
    }

    /// Running → released. `false` if it was not running.
    pub fn release(&mut self) -> bool {
        if self.state != State::Running {
            return false;
        }
        self.state = State::Released;
        true
    }

    /// Starts draining, `--shutdown-timeout` from `now`. `false` if it was draining already.
    pub fn drain(&mut self, now: Instant) -> bool {
        if !self.serving() {
            return false;
        }
        self.state = State::Draining {
            deadline: now + self.shutdown_timeout,
        };
        true
    }

    /// Draining with the sessions still open: they close once what was received is answered.
    pub fn sessions_to_close(&self) -> bool {
        !self.serving() && !self.sessions_closed
    }

    /// The sessions were closed.
    pub fn sessions_closed(&mut self) {
        self.sessions_closed = true;
    }

    /// Whether the loop ends now: draining, with the sessions closed and `idle` (nothing in
    /// flight, nothing pending), or past the deadline (logged: what is in flight leaks).
    pub fn finished(&self, idle: bool, in_flight: usize) -> Finish {
        let State::Draining { deadline } = self.state else {
            return Finish::No;
        };
        if self.sessions_closed && idle {
            return Finish::Done;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                worker = self.worker,
                in_flight,
                "shutdown timed out with operations in flight; their buffers are leaked, not freed"
            );
            return Finish::TimedOut;
        }
        Finish::No
    }
}

/// Whether the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Finish {
    No,
    /// Everything answered and completed.
    Done,
    /// The shutdown timeout passed first.
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(timeout: Duration) -> Lifecycle {
        let config = ServerConfig {
            shutdown_timeout: timeout,
            ..ServerConfig::default()
        };
        Lifecycle::new(&config, 0)
    }

    #[test]
    fn running_released_draining_closed_done() {
        let mut l = lifecycle(Duration::from_secs(60));
        assert!(l.receiving() && l.serving() && l.opens_sessions());
        assert_eq!(l.finished(true, 0), Finish::No);
        assert!(l.release());
        assert!(!l.release(), "once");
        assert!(l.released() && !l.receiving() && l.serving());
        assert!(l.drain(Instant::now()));
        assert!(!l.drain(Instant::now()), "once");
        assert!(!l.serving() && !l.released());
        // Draining: sessions still open (and opened) until they are closed.
        assert!(l.opens_sessions() && l.sessions_to_close());
        assert_eq!(l.finished(true, 0), Finish::No);
        l.sessions_closed();
        assert!(!l.opens_sessions() && !l.sessions_to_close());
        assert_eq!(l.finished(false, 1), Finish::No);
        assert_eq!(l.finished(true, 0), Finish::Done);
    }

    #[test]
    fn a_drain_past_its_deadline_ends() {
        let mut l = lifecycle(Duration::ZERO);
        assert!(l.drain(Instant::now()));
        assert_eq!(l.finished(false, 3), Finish::TimedOut);
    }

    #[test]
    fn a_released_worker_cannot_be_released_after_draining() {
        let mut l = lifecycle(Duration::from_secs(60));
        assert!(l.drain(Instant::now()));
        assert!(!l.release());
        assert!(!l.released());
    }
}
