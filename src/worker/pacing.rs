//! How the loop waits for the kernel: block for one completion, gather a batch while batches
//! are coming (`--batch-wait`), poll without sleeping after a busy turn (`--busy-poll`), or
//! not wait at all when work is ready without the kernel. A sans-IO decision from what the
//! last turn saw; the loop carries it out.

use std::time::Duration;

use crate::config::ServerConfig;

/// A turn that drained at least this many completions counts as busy: the next wait may
/// hold out for a batch (`--batch-wait`).
const BUSY_TURN: usize = 8;

/// While draining, the loop wakes up this often to notice the deadline even if nothing
/// completes.
const DRAIN_WAKE: Duration = Duration::from_millis(20);

/// The waiting settings, and what the last turn drained.
pub(super) struct Pacing {
    batch_wait: Option<Duration>,
    batch_size: usize,
    busy_poll: Option<Duration>,
    /// Completions the last turn drained.
    turn_completions: usize,
}

/// One wait: enter the kernel for `want` completions, for at most `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wait {
    pub want: usize,
    pub timeout: Option<Duration>,
    /// Before a blocking wait: poll (an enter with a zero timeout) for up to this long.
    pub spin: Option<Duration>,
}

impl Pacing {
    pub fn new(config: &ServerConfig) -> Pacing {
        Pacing {
            batch_wait: config.batch_wait,
            batch_size: config.batch_size,
            busy_poll: config.busy_poll,
            turn_completions: 0,
        }
    }

    /// The turn drained `completions` completions.
    pub fn turn(&mut self, completions: usize) {
        self.turn_completions = completions;
    }

    /// The next wait: none when work is `ready` without the kernel (datagrams with reply slots
    /// free, sockets to close, a due timer), a short timed one while `draining`.
    pub fn plan(&self, ready: bool, draining: bool) -> Wait {
        let (want, timeout) = match self.batch_wait {
            _ if ready => (0, None),
            _ if draining => (1, Some(DRAIN_WAKE)),
            None => (1, None),
            // Gather a batch only while batches are coming: at low load a timed wait would
            // fire its timer for nothing on every turn.
            Some(wait) if self.turn_completions >= BUSY_TURN => (self.batch_size, Some(wait)),
            Some(_) => (1, None),
        };
        // `--busy-poll`: after a busy turn, poll for completions without sleeping for up to
        // the configured time before the blocking wait. While the worker polls it never
        // sleeps, so senders pay no wake-up; the price is a core kept busy for that long
        // after each burst. Idle (nothing last turn): do not burn a core waiting for nothing.
        let spin = if want == 1 && timeout.is_none() && self.turn_completions > 0 {
            self.busy_poll
        } else {
            None
        };
        Wait {
            want,
            timeout,
            spin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing(batch_wait: Option<Duration>, busy_poll: Option<Duration>) -> Pacing {
        let config = ServerConfig {
            batch_wait,
            batch_size: 16,
            busy_poll,
            ..ServerConfig::default()
        };
        Pacing::new(&config)
    }

    fn wait(want: usize, timeout: Option<Duration>, spin: Option<Duration>) -> Wait {
        Wait {
            want,
            timeout,
            spin,
        }
    }

    #[test]
    fn ready_work_never_waits_and_draining_wakes_for_the_deadline() {
        let mut p = pacing(
            Some(Duration::from_micros(50)),
            Some(Duration::from_micros(20)),
        );
        p.turn(100);
        assert_eq!(p.plan(true, false), wait(0, None, None));
        assert_eq!(p.plan(true, true), wait(0, None, None));
        assert_eq!(p.plan(false, true), wait(1, Some(DRAIN_WAKE), None));
    }

    #[test]
    fn a_batch_is_gathered_only_after_a_busy_turn() {
        let batch = Duration::from_micros(50);
        let mut p = pacing(Some(batch), None);
        p.turn(BUSY_TURN);
        assert_eq!(p.plan(false, false), wait(16, Some(batch), None));
        p.turn(BUSY_TURN - 1);
        assert_eq!(p.plan(false, false), wait(1, None, None));
        let p = pacing(None, None);
        assert_eq!(p.plan(false, false), wait(1, None, None));
    }

    #[test]
    fn busy_poll_spins_only_after_a_turn_that_saw_completions() {
        let poll = Duration::from_micros(20);
        let mut p = pacing(None, Some(poll));
        p.turn(0);
        assert_eq!(p.plan(false, false), wait(1, None, None));
        p.turn(1);
        assert_eq!(p.plan(false, false), wait(1, None, Some(poll)));
        // Not before a batch wait, which has a timeout of its own.
        let mut p = pacing(Some(Duration::from_micros(50)), Some(poll));
        p.turn(BUSY_TURN);
        assert_eq!(p.plan(false, false).spin, None);
    }
}
