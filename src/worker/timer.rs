//! The handler's timer: one `IORING_OP_TIMEOUT` per worker for the earliest instant the
//! handler asked to be called back at (`SessionHandler::next_timer`), as the idle timer does
//! for sessions. A sans-IO decision: given the instant now, what the handler wants and what
//! is armed, it says whether to call the handler, arm a timeout, bring the armed one forward
//! or do nothing. The worker carries the step out; the rules are unit-tested here with a
//! virtual clock.
//!
//! Why the rules look like this:
//! - A later deadline never touches the armed timeout: it fires early, the handler is asked
//!   again and the timeout is armed for what it wants then. One spurious wake-up costs less
//!   than a cancel and a new arm on every change (a QUIC endpoint moves its deadline on
//!   nearly every packet).
//! - An earlier deadline updates the armed timeout in place (`IORING_TIMEOUT_UPDATE`, 5.11):
//!   one entry, no second timeout in flight. One update at a time (its timespec is read by
//!   the kernel until it completes); a second wish waits for the first update's completion.
//! - A deadline that has passed calls the handler only when a reply slot is free: a handler
//!   blocked on a full send pool (a stack that stopped polling transmits) asks for "now", and
//!   the send completions that free slots wake the worker to call it.

use std::time::{Duration, Instant};

/// What the worker does about the handler's timer this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerStep {
    /// Nothing to do (no deadline, or the armed timeout fires in time, or the deadline has
    /// passed but no reply slot is free).
    Idle,
    /// The deadline has passed and a reply slot is free: call `on_timer`.
    Fire,
    /// Arm a timeout this far from now.
    Arm(Duration),
    /// Bring the armed timeout forward to this far from now.
    Update(Duration),
}

/// The handler timer's state as the worker last left it.
#[derive(Debug, Default)]
pub(super) struct HandlerTimer {
    /// When the armed timeout fires (`None`: no timeout armed).
    armed: Option<Instant>,
    /// An update of the armed timeout is in flight.
    updating: bool,
    /// The deadline had passed at the end of the last turn and a reply slot was free: the
    /// next wait does not block.
    ready: bool,
}

impl HandlerTimer {
    /// The step for a handler that wants to be called at `wanted`, at `now`, with
    /// `can_send` saying whether a reply slot is free.
    pub fn plan(&self, now: Instant, wanted: Option<Instant>, can_send: bool) -> TimerStep {
        let Some(wanted) = wanted else {
            return TimerStep::Idle;
        };
        if wanted <= now {
            return if can_send {
                TimerStep::Fire
            } else {
                TimerStep::Idle
            };
        }
        match self.armed {
            None => TimerStep::Arm(wanted - now),
            Some(armed) if wanted < armed && !self.updating => TimerStep::Update(wanted - now),
            Some(_) => TimerStep::Idle,
        }
    }

    /// The step was carried out.
    pub fn note(&mut self, step: TimerStep, wanted: Option<Instant>) {
        match step {
            TimerStep::Arm(_) => self.armed = wanted,
            TimerStep::Update(_) => {
                self.armed = wanted;
                self.updating = true;
            }
            TimerStep::Idle | TimerStep::Fire => {}
        }
    }

    /// The armed timeout completed (fired, or was cancelled).
    pub fn fired(&mut self) {
        self.armed = None;
    }

    /// The update in flight completed (whether or not the timeout was still armed).
    pub fn updated(&mut self) {
        self.updating = false;
    }

    /// Whether the handler is due again without waiting (see `ready`).
    pub fn ready(&self) -> bool {
        self.ready
    }

    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtual clock: instants as milliseconds after a fixed origin.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn no_deadline_does_nothing() {
        let clock = Clock(Instant::now());
        let t = HandlerTimer::default();
        assert_eq!(t.plan(clock.at(0), None, true), TimerStep::Idle);
    }

    #[test]
    fn a_future_deadline_is_armed_once_and_a_later_one_leaves_it() {
        let clock = Clock(Instant::now());
        let mut t = HandlerTimer::default();
        let step = t.plan(clock.at(10), Some(clock.at(25)), true);
        assert_eq!(step, TimerStep::Arm(ms(15)));
        t.note(step, Some(clock.at(25)));
        // Later or equal: the armed timeout fires first; the handler is asked again then.
        assert_eq!(
            t.plan(clock.at(11), Some(clock.at(40)), true),
            TimerStep::Idle
        );
        assert_eq!(
            t.plan(clock.at(11), Some(clock.at(25)), true),
            TimerStep::Idle
        );
    }

    #[test]
    fn an_earlier_deadline_updates_once_at_a_time() {
        let clock = Clock(Instant::now());
        let mut t = HandlerTimer::default();
        t.note(TimerStep::Arm(ms(100)), Some(clock.at(100)));
        let step = t.plan(clock.at(0), Some(clock.at(30)), true);
        assert_eq!(step, TimerStep::Update(ms(30)));
        t.note(step, Some(clock.at(30)));
        // Earlier still while the update is in flight: wait for its completion.
        assert_eq!(
            t.plan(clock.at(1), Some(clock.at(20)), true),
            TimerStep::Idle
        );
        t.updated();
        assert_eq!(
            t.plan(clock.at(2), Some(clock.at(20)), true),
            TimerStep::Update(ms(18))
        );
    }

    #[test]
    fn a_passed_deadline_fires_only_with_a_free_slot() {
        let clock = Clock(Instant::now());
        let mut t = HandlerTimer::default();
        t.note(TimerStep::Arm(ms(5)), Some(clock.at(5)));
        t.fired();
        assert_eq!(t.armed, None);
        assert_eq!(
            t.plan(clock.at(5), Some(clock.at(5)), true),
            TimerStep::Fire
        );
        assert_eq!(
            t.plan(clock.at(9), Some(clock.at(5)), false),
            TimerStep::Idle
        );
        // Once fired and re-asked, a new future deadline is armed afresh.
        assert_eq!(
            t.plan(clock.at(9), Some(clock.at(12)), true),
            TimerStep::Arm(ms(3))
        );
    }

    /// A bounded driver over a virtual clock: the handler's deadlines are met, never early,
    /// and every step is taken at most once per event.
    #[test]
    fn driven_over_a_virtual_clock_every_deadline_is_met_once() {
        let clock = Clock(Instant::now());
        let mut t = HandlerTimer::default();
        // The handler wants callbacks at these instants, one after another.
        let mut wishes = vec![7u64, 7, 3, 50, 51, 200];
        wishes.reverse();
        let mut calls = Vec::new();
        let mut now = 0u64;
        for _ in 0..1000 {
            let Some(&wish) = wishes.last() else { break };
            let wanted = Some(clock.at(wish));
            match t.plan(clock.at(now), wanted, true) {
                TimerStep::Fire => {
                    calls.push(now);
                    wishes.pop();
                }
                step @ (TimerStep::Arm(_) | TimerStep::Update(_)) => {
                    if matches!(step, TimerStep::Update(_)) {
                        t.updated(); // the update completes at once here
                    }
                    t.note(step, wanted);
                    t.updating = false;
                }
                TimerStep::Idle => {
                    // Advance the clock to the armed timeout, which completes.
                    now = t
                        .armed
                        .map(|a| (a - clock.0).as_millis() as u64)
                        .unwrap_or(now);
                    t.fired();
                }
            }
        }
        assert!(wishes.is_empty(), "every wish served, bounded");
        assert_eq!(calls, vec![7, 7, 7, 50, 51, 200]);
    }
}
