//! Test doubles and helpers shared by the send pool's unit tests.

use super::*;

/// A pool whose every reply takes a slot of its own (trains in place off: the grouping
/// tests).
pub(crate) fn pool(count: usize, cap: usize) -> SendPool {
    let mut p = SendPool::new(count, cap, false, true).unwrap();
    p.no_append = true;
    p
}

/// A pool as the engine makes it: consecutive replies to one peer join in place.
pub(crate) fn appending_pool(count: usize, cap: usize) -> SendPool {
    SendPool::new(count, cap, false, true).unwrap()
}

pub(crate) fn dest(peer: &str) -> Dest {
    Dest {
        fd: 3,
        peer: peer.parse().unwrap(),
        local: None,
        connected: false,
    }
}

/// A reply to `127.0.0.1:5` on descriptor 3 under an anti-amplification `budget`.
pub(crate) fn budgeted_reply<'a>(
    pool: &'a mut SendPool,
    counters: &'a mut crate::stats::Stats,
    budget: &'a mut u64,
) -> crate::handler::Reply<'a> {
    crate::handler::Reply {
        pool,
        counters,
        dest: dest("127.0.0.1:5"),
        listener_fd: 3,
        session: None,
        budget: Some(budget),
        worker: None,
    }
}

pub(crate) fn queue_bytes(p: &mut SendPool, peer: &str, bytes: &[u8]) -> Result<usize, SendError> {
    p.queue_bytes(dest(peer), bytes)
}

/// Accepts `room` entries, then fails every push (as a full ring whose completion queue
/// overflows does), remembering what it accepted.
pub(crate) struct FailingSink {
    pub room: usize,
    pub accepted: Vec<UserData>,
}

impl Submit for FailingSink {
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        if self.room == 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.room -= 1;
        self.accepted
            .push(UserData::decode(entry.get_user_data()).unwrap());
        Ok(())
    }
}

pub(crate) fn free_list_is_a_set(p: &SendPool) {
    let mut seen = vec![false; p.count];
    for &i in &p.free {
        assert!(!seen[i as usize], "slot {i} is on the free list twice");
        seen[i as usize] = true;
        assert_eq!(p.meta[i as usize].state, SlotState::Free);
    }
}
