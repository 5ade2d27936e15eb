//! Retransmission: the timeout schedule (exponential backoff, optionally capped) and the
//! per-level timer queues that drive resends and give-ups.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Retransmission timeout after `resends` resends: `base * 2^resends` (saturating).
pub fn backoff(base: Duration, resends: u32) -> Duration {
    match 1u32.checked_shl(resends) {
        Some(factor) => base.checked_mul(factor).unwrap_or(Duration::MAX),
        None => Duration::MAX,
    }
}

/// [`backoff`], capped at `cap` when one is given (`--max-timeout`).
pub fn capped_backoff(base: Duration, resends: u32, cap: Option<Duration>) -> Duration {
    let t = backoff(base, resends);
    cap.map_or(t, |c| t.min(c.max(base)))
}

/// Longest a request can stay pending before it is given up: the sum of its timeouts.
pub fn give_up_after(base: Duration, retries: u32, cap: Option<Duration>) -> Duration {
    (0..=retries).fold(Duration::ZERO, |acc, r| {
        acc.saturating_add(capped_backoff(base, r, cap))
    })
}

/// Retransmission timers: one FIFO per resend level. All entries of a level have the same
/// timeout and are pushed in time order, so each FIFO is sorted and push/pop are O(1).
/// Entries are invalidated lazily (the slot is checked when the timer fires).
#[derive(Debug)]
pub struct Timers {
    levels: Vec<VecDeque<(Instant, u32, u64)>>,
}

impl Timers {
    /// Timers for `retries` resends (levels 0..=retries).
    pub fn new(retries: u32) -> Self {
        Timers {
            levels: (0..=retries).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Arms a timer for `(client, seq)` at resend level `level`.
    pub fn push(&mut self, level: u32, deadline: Instant, client: u32, seq: u64) {
        if let Some(q) = self.levels.get_mut(level as usize) {
            q.push_back((deadline, client, seq));
        }
    }

    /// Pops one expired timer: `(level, client, seq)`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u32, u32, u64)> {
        for (level, q) in self.levels.iter_mut().enumerate() {
            if q.front().is_some_and(|t| t.0 <= now) {
                let (_, client, seq) = q.pop_front()?;
                return Some((level as u32, client, seq));
            }
        }
        None
    }

    /// Earliest armed deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|q| q.front().map(|t| t.0))
            .min()
    }

    /// Drops all timers.
    pub fn clear(&mut self) {
        self.levels.iter_mut().for_each(VecDeque::clear);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let base = Duration::from_millis(200);
        let got: Vec<_> = (0..4).map(|r| backoff(base, r).as_millis()).collect();
        assert_eq!(got, vec![200, 400, 800, 1600]);
        assert_eq!(backoff(base, 40), Duration::MAX);
    }

    #[test]
    fn timers_fire_in_order_per_level() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut tm = Timers::new(2);
        tm.push(0, t0 + ms(10), 0, 1);
        tm.push(0, t0 + ms(20), 1, 1);
        tm.push(1, t0 + ms(5), 2, 9);
        tm.push(5, t0, 0, 0); // beyond --retries: ignored
        assert_eq!(tm.next_deadline(), Some(t0 + ms(5)));
        assert_eq!(tm.pop_due(t0), None);
        let mut fired = Vec::new();
        while let Some(x) = tm.pop_due(t0 + ms(15)) {
            fired.push(x);
        }
        fired.sort();
        assert_eq!(fired, vec![(0, 0, 1), (1, 2, 9)]);
        assert_eq!(tm.next_deadline(), Some(t0 + ms(20)));
        tm.clear();
        assert_eq!(tm.next_deadline(), None);
    }

    #[test]
    fn capped_backoff_and_give_up_time() {
        let ms = Duration::from_millis;
        assert_eq!(capped_backoff(ms(50), 3, None), ms(400));
        assert_eq!(capped_backoff(ms(50), 3, Some(ms(200))), ms(200));
        assert_eq!(
            capped_backoff(ms(50), 0, Some(ms(10))),
            ms(50),
            "never below base"
        );
        // 50 + 100 + 200 + 200
        assert_eq!(give_up_after(ms(50), 3, Some(ms(200))), ms(550));
        assert_eq!(give_up_after(ms(50), 2, None), ms(350));
    }
}
