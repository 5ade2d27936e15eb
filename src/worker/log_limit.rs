//! A rate limit for warning lines on paths a peer or the kernel can drive (failed receives,
//! failed sends, sockets that cannot be opened): one line a second, saying how many it held
//! back, so that exhaustion degrades with a counter and a log line, never a flood.

use std::time::{Duration, Instant};

/// Limits a log line to one per second, counting what it held back.
pub(super) struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub fn new() -> LogLimit {
        LogLimit {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since last time)` when a line may be logged now.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_saying_how_many_were_held_back() {
        let mut limit = LogLimit::new();
        let start = Instant::now();
        assert_eq!(limit.check_at(start), Some(0));
        assert_eq!(limit.check_at(start + Duration::from_millis(10)), None);
        assert_eq!(limit.check_at(start + Duration::from_millis(999)), None);
        assert_eq!(limit.check_at(start + Duration::from_secs(1)), Some(2));
        assert_eq!(limit.check_at(start + Duration::from_millis(1500)), None);
        assert_eq!(limit.check_at(start + Duration::from_secs(3)), Some(1));
    }
}
