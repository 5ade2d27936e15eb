//! The ledger of everything a worker has in flight: every entry `Io` pushes is recorded here
//! when the ring takes it, and retired here by its final completion. Receives, sends, the
//! wake-up read, timeouts and cancels alike: shutdown waits for the count to reach zero, and
//! teardown frees the memory the kernel reads (buffers, send slots, headers) only then.
//!
//! Plain bookkeeping, no system call: the rules (a multishot receive ends on its completion
//! without `F_MORE`; a late completion of an older arming retires nothing) are unit-tested
//! below.

use crate::op::{next_generation, OpKind, UserData};

/// What is in flight, by kind.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The listener's multishot receive is armed (under `recv_generation`).
    recv_armed: bool,
    recv_generation: u32,
    /// Session sockets with a multishot receive armed.
    session_recvs: usize,
    /// `SENDMSG`/`SEND` entries of the send pool (a train is one).
    sends: usize,
    wake_armed: bool,
    tick_armed: bool,
    /// The handler's timer is armed (under `timer_generation`).
    timer_armed: bool,
    timer_generation: u32,
    /// An update of the handler's timer is in flight.
    timer_updating: bool,
    cancels: usize,
}

impl Ledger {
    /// Operations the kernel has yet to complete.
    pub fn in_flight(&self) -> usize {
        usize::from(self.recv_armed)
            + self.session_recvs
            + self.sends
            + usize::from(self.wake_armed)
            + usize::from(self.tick_armed)
            + usize::from(self.timer_armed)
            + usize::from(self.timer_updating)
            + self.cancels
    }

    /// The `user_data` the next arming of `kind` goes under: a new generation for the
    /// listener's receive and the handler's timer (so a late completion of the previous one
    /// is recognised), generation 0 for the rest.
    pub fn next(&self, kind: OpKind) -> UserData {
        let generation = match kind {
            OpKind::Recv => next_generation(self.recv_generation),
            OpKind::Timer => next_generation(self.timer_generation),
            _ => 0,
        };
        UserData::new(kind, generation, 0)
    }

    /// The ring took an entry of `kind`, armed under `generation`.
    #[inline]
    pub fn pushed(&mut self, kind: OpKind, generation: u32) {
        match kind {
            OpKind::Recv => {
                self.recv_armed = true;
                self.recv_generation = generation;
            }
            OpKind::SessionRecv => self.session_recvs += 1,
            OpKind::Send => self.sends += 1,
            OpKind::Wake => self.wake_armed = true,
            OpKind::Tick => self.tick_armed = true,
            OpKind::Timer => {
                self.timer_armed = true;
                self.timer_generation = generation;
            }
            OpKind::TimerUpdate => self.timer_updating = true,
            OpKind::Cancel => self.cancels += 1,
        }
    }

    /// Records a completion of `ud` (`more`: `F_MORE`, the request goes on). Returns whether
    /// it retired the operation the ledger holds for it: `false` for a completion that is
    /// not the last of a multishot request, and for a late one of an older arming (the
    /// listener's receive, the handler's timer) that was retired already.
    ///
    /// Every pushed entry has exactly one final completion, whatever the part it belongs to
    /// makes of it (the send pool refuses a completion it cannot match, and counts it): the
    /// ledger counts what the kernel holds.
    #[inline]
    pub fn completed(&mut self, ud: UserData, more: bool) -> bool {
        match ud.kind {
            OpKind::Recv => {
                let current = !more && self.recv_armed && ud.generation == self.recv_generation;
                if current {
                    self.recv_armed = false;
                }
                current
            }
            OpKind::SessionRecv => {
                if !more {
                    self.session_recvs = self.session_recvs.saturating_sub(1);
                }
                !more
            }
            OpKind::Send => {
                if !more {
                    self.sends = self.sends.saturating_sub(1);
                }
                !more
            }
            OpKind::Wake => std::mem::take(&mut self.wake_armed),
            OpKind::Tick => std::mem::take(&mut self.tick_armed),
            OpKind::Timer => {
                // Fired (-ETIME) or cancelled: either way the timeout is no longer armed.
                let current = self.timer_armed && ud.generation == self.timer_generation;
                if current {
                    self.timer_armed = false;
                }
                current
            }
            // 0, or -ENOENT when the timeout had fired first.
            OpKind::TimerUpdate => std::mem::take(&mut self.timer_updating),
            OpKind::Cancel => {
                let current = self.cancels > 0;
                self.cancels = self.cancels.saturating_sub(1);
                current
            }
        }
    }

    /// The listener's receive, if armed (to cancel it).
    pub fn recv(&self) -> Option<UserData> {
        self.recv_armed
            .then(|| UserData::new(OpKind::Recv, self.recv_generation, 0))
    }

    /// The handler's timer as last armed (to update or cancel it).
    pub fn timer(&self) -> UserData {
        UserData::new(OpKind::Timer, self.timer_generation, 0)
    }

    pub fn timer_armed(&self) -> bool {
        self.timer_armed
    }

    pub fn timer_updating(&self) -> bool {
        self.timer_updating
    }

    pub fn tick_armed(&self) -> bool {
        self.tick_armed
    }

    pub fn wake_armed(&self) -> bool {
        self.wake_armed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [OpKind; 8] = [
        OpKind::Recv,
        OpKind::SessionRecv,
        OpKind::Send,
        OpKind::Wake,
        OpKind::Tick,
        OpKind::Timer,
        OpKind::TimerUpdate,
        OpKind::Cancel,
    ];

    /// Everything pushed is in flight until its final completion, sends included (issue 14:
    /// the send pool kept a count of its own beside this one).
    #[test]
    fn every_kind_is_in_flight_from_push_to_final_completion() {
        let mut ledger = Ledger::default();
        let mut armed = Vec::new();
        for kind in KINDS {
            let ud = ledger.next(kind);
            ledger.pushed(kind, ud.generation);
            armed.push(ud);
        }
        assert_eq!(ledger.in_flight(), KINDS.len());
        for (n, ud) in armed.into_iter().enumerate() {
            // A multishot request goes on while F_MORE is set.
            if matches!(ud.kind, OpKind::Recv | OpKind::SessionRecv) {
                assert!(!ledger.completed(ud, true));
                assert_eq!(ledger.in_flight(), KINDS.len() - n);
            }
            assert!(ledger.completed(ud, false), "{:?}", ud.kind);
            assert_eq!(ledger.in_flight(), KINDS.len() - n - 1);
        }
        assert_eq!(ledger.recv(), None);
        assert!(!ledger.timer_armed() && !ledger.tick_armed() && !ledger.wake_armed());
    }

    #[test]
    fn a_late_completion_of_an_older_arming_retires_nothing() {
        let mut ledger = Ledger::default();
        for kind in [OpKind::Recv, OpKind::Timer] {
            let old = ledger.next(kind);
            ledger.pushed(kind, old.generation);
            assert!(ledger.completed(old, false));
            let new = ledger.next(kind);
            assert_ne!(new.generation, old.generation);
            ledger.pushed(kind, new.generation);
            assert!(
                !ledger.completed(old, false),
                "{kind:?}: the old arming again"
            );
            assert_eq!(ledger.in_flight(), 1);
            assert!(ledger.completed(new, false));
            assert_eq!(ledger.in_flight(), 0);
        }
    }

    #[test]
    fn counts_never_go_below_zero() {
        let mut ledger = Ledger::default();
        for kind in KINDS {
            ledger.completed(UserData::new(kind, 0, 0), false);
        }
        assert_eq!(ledger.in_flight(), 0);
    }
}
