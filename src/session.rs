//! Sessions: the details a [`SessionHandler`](crate::SessionHandler) meets besides the types
//! at the crate root — which session ([`SessionId`]), why it ended ([`CloseReason`]), why a
//! deferred reply was refused ([`DeferredError`]).
//!
//! Inside the crate, the sans-IO bookkeeping behind them: the per-worker table of peers, idle
//! expiry and admission limits. No syscalls and no clock reads here: the worker passes the
//! time in (`now_ms`, read once per loop turn), so tests drive it with a virtual clock.
//!
//! Activity costs one store (`last_active = now`). Expiry uses one heap entry per session:
//! when an entry comes due, a session active since is pushed back to `last_active + idle`;
//! only a session really idle for the whole timeout is reported. So the heap is touched once
//! per idle period per session, never per datagram.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use slab::Slab;

use crate::op::next_generation;

pub use crate::handler::DeferredError;

/// Milliseconds on the worker's clock.
pub(crate) type Millis = u64;

/// A session's address in its worker's table: slot plus generation, so a handle to a closed
/// session never reaches the session that reused its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// No datagram for `--idle-timeout`.
    Idle,
    /// The handler asked for it (`Reply::close_session`).
    HandlerClosed,
    /// The server is shutting down.
    Shutdown,
}

/// Why a new peer was not given a session. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// This worker holds `max_sessions_per_worker`.
    WorkerFull,
    /// All workers together hold `max_sessions`.
    TotalFull,
    /// More than `max_new_per_sec` new sessions this second on this worker.
    RateLimited,
    /// This source address holds `max_per_source` sessions.
    SourceFull,
}

/// Admission limits; `usize::MAX` / `u32::MAX` mean unlimited.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub idle_timeout_ms: Millis,
    pub max_sessions_per_worker: usize,
    pub max_sessions: usize,
    pub max_new_per_sec: u32,
    pub max_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout_ms: 30_000,
            max_sessions_per_worker: usize::MAX,
            max_sessions: usize::MAX,
            max_new_per_sec: u32::MAX,
            max_per_source: u32::MAX,
        }
    }
}

/// One session: its peer, when it was last active, and the worker's value for it.
#[derive(Debug)]
pub(crate) struct Entry<V> {
    pub peer: SocketAddr,
    pub last_active: Millis,
    pub generation: u32,
    pub value: V,
}

/// A token bucket refilled continuously: `rate` tokens per second, holding at most `rate`.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: u32,
    tokens: f64,
    last: Millis,
}

impl TokenBucket {
    fn new(rate: u32) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: f64::from(rate),
            last: 0,
        }
    }

    fn take(&mut self, now: Millis) -> bool {
        if self.rate == u32::MAX {
            return true;
        }
        let elapsed = now.saturating_sub(self.last) as f64 / 1000.0;
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(self.rate));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The per-worker session table.
pub(crate) struct SessionTable<V> {
    by_peer: HashMap<SocketAddr, SessionId>,
    slots: Slab<Entry<V>>,
    /// Generation of each slot ever used, so a reused slot gets a new one.
    generations: Vec<u32>,
    due: BinaryHeap<Reverse<(Millis, u32, u32)>>,
    per_source: HashMap<IpAddr, u32>,
    limits: Limits,
    total: Arc<AtomicUsize>,
    /// Places in `total` taken by `admit` and not yet used by `insert`.
    reserved: usize,
    new_sessions: TokenBucket,
}

impl<V> SessionTable<V> {
    /// `total` is shared by every worker's table to enforce `max_sessions`.
    pub fn new(limits: Limits, total: Arc<AtomicUsize>) -> SessionTable<V> {
        SessionTable {
            by_peer: HashMap::new(),
            slots: Slab::new(),
            generations: Vec::new(),
            due: BinaryHeap::new(),
            per_source: HashMap::new(),
            new_sessions: TokenBucket::new(limits.max_new_per_sec),
            limits,
            total,
            reserved: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn lookup(&self, peer: &SocketAddr) -> Option<SessionId> {
        self.by_peer.get(peer).copied()
    }

    pub fn get(&self, id: SessionId) -> Option<&Entry<V>> {
        self.slots
            .get(id.slot as usize)
            .filter(|e| e.generation == id.generation)
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Entry<V>> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|e| e.generation == id.generation)
    }

    /// Records activity: one store, no heap operation.
    #[cfg(test)]
    pub fn touch(&mut self, id: SessionId, now: Millis) {
        if let Some(e) = self.get_mut(id) {
            e.last_active = now;
        }
    }

    /// Checks every limit for a new session from `peer`, consuming a rate token and
    /// reserving a place in the server-wide total when it passes (atomically, so two workers
    /// cannot both take the last place). Call right before `insert`.
    pub fn admit(&mut self, peer: &SocketAddr, now: Millis) -> Result<(), Refusal> {
        if self.slots.len() + self.reserved >= self.limits.max_sessions_per_worker {
            return Err(Refusal::WorkerFull);
        }
        if self.per_source.get(&peer.ip()).copied().unwrap_or(0) >= self.limits.max_per_source {
            return Err(Refusal::SourceFull);
        }
        let max = self.limits.max_sessions;
        if self.total.load(Ordering::Relaxed) >= max {
            return Err(Refusal::TotalFull);
        }
        if !self.new_sessions.take(now) {
            return Err(Refusal::RateLimited);
        }
        let reserved = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        if reserved.is_err() {
            return Err(Refusal::TotalFull);
        }
        self.reserved += 1;
        Ok(())
    }

    /// Adds a session for `peer` (which must not have one) and schedules its idle check.
    pub fn insert(&mut self, peer: SocketAddr, now: Millis, value: V) -> SessionId {
        let entry = self.slots.vacant_entry();
        let slot = entry.key();
        if self.generations.len() <= slot {
            self.generations.resize(slot + 1, 0);
        }
        let generation = next_generation(self.generations[slot]);
        self.generations[slot] = generation;
        entry.insert(Entry {
            peer,
            last_active: now,
            generation,
            value,
        });
        let id = SessionId {
            slot: slot as u32,
            generation,
        };
        self.by_peer.insert(peer, id);
        *self.per_source.entry(peer.ip()).or_insert(0) += 1;
        if self.reserved > 0 {
            self.reserved -= 1;
        } else {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        self.due.push(Reverse((
            now + self.limits.idle_timeout_ms,
            id.slot,
            generation,
        )));
        id
    }

    /// Removes a session, returning its entry.
    pub fn remove(&mut self, id: SessionId) -> Option<Entry<V>> {
        self.get(id)?;
        let entry = self.slots.remove(id.slot as usize);
        if self.by_peer.get(&entry.peer) == Some(&id) {
            self.by_peer.remove(&entry.peer);
        }
        if let Some(n) = self.per_source.get_mut(&entry.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.peer.ip());
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        Some(entry)
    }

    /// Appends to `out` every session idle for the whole timeout at `now`. Sessions active
    /// since their check was scheduled are rescheduled instead.
    pub fn expired(&mut self, now: Millis, out: &mut Vec<SessionId>) {
        let idle = self.limits.idle_timeout_ms;
        while let Some(&Reverse((deadline, slot, generation))) = self.due.peek() {
            if deadline > now {
                break;
            }
            self.due.pop();
            let id = SessionId { slot, generation };
            let Some(entry) = self.get(id) else {
                continue; // removed since: its heap entry just lapses
            };
            let due_at = entry.last_active + idle;
            if due_at <= now {
                out.push(id);
            } else {
                self.due.push(Reverse((due_at, slot, generation)));
            }
        }
    }

    /// When the next idle check is due, if any session exists.
    pub fn next_check(&self) -> Option<Millis> {
        self.due.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Every live session (for shutdown).
    pub fn ids(&self) -> Vec<SessionId> {
        self.slots
            .iter()
            .map(|(slot, e)| SessionId {
                slot: slot as u32,
                generation: e.generation,
            })
            .collect()
    }
}

impl<V> Drop for SessionTable<V> {
    fn drop(&mut self) {
        // Keep the shared total honest if a worker goes away with sessions open.
        self.total
            .fetch_sub(self.slots.len() + self.reserved, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 1000 + n))
    }

    fn table(limits: Limits) -> SessionTable<u32> {
        SessionTable::new(limits, Arc::new(AtomicUsize::new(0)))
    }

    #[test]
    fn idle_sessions_expire_and_active_ones_are_rescheduled() {
        let mut t = table(Limits {
            idle_timeout_ms: 1000,
            ..Limits::default()
        });
        let a = t.insert(peer(1), 0, 1);
        let b = t.insert(peer(2), 0, 2);
        // b is active at 900: its check at 1000 must push it to 1900.
        t.touch(b, 900);
        let mut out = Vec::new();
        t.expired(999, &mut out);
        assert!(out.is_empty());
        t.expired(1000, &mut out);
        assert_eq!(out, vec![a]);
        t.remove(a);
        out.clear();
        t.expired(1899, &mut out);
        assert!(out.is_empty());
        assert_eq!(t.next_check(), Some(1900));
        t.expired(1900, &mut out);
        assert_eq!(out, vec![b]);
    }

    #[test]
    fn activity_every_tick_never_expires() {
        let mut t = table(Limits {
            idle_timeout_ms: 100,
            ..Limits::default()
        });
        let a = t.insert(peer(1), 0, 0);
        let mut out = Vec::new();
        for now in (0..10_000).step_by(50) {
            t.touch(a, now);
            t.expired(now, &mut out);
        }
        assert!(out.is_empty());
        // The heap never holds more than one entry for the session.
        assert_eq!(t.due.len(), 1);
    }

    #[test]
    fn removed_sessions_do_not_expire_and_slots_get_new_generations() {
        let mut t = table(Limits {
            idle_timeout_ms: 10,
            ..Limits::default()
        });
        let a = t.insert(peer(1), 0, 0);
        assert!(t.remove(a).is_some());
        assert!(t.remove(a).is_none());
        let b = t.insert(peer(1), 5, 0);
        assert_eq!(a.slot, b.slot);
        assert_ne!(a.generation, b.generation);
        assert!(t.get(a).is_none());
        let mut out = Vec::new();
        t.expired(100, &mut out);
        assert_eq!(out, vec![b]);
        assert_eq!(t.lookup(&peer(1)), Some(b));
    }

    #[test]
    fn limits_are_enforced_and_released() {
        let total = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            max_sessions_per_worker: 3,
            max_sessions: 4,
            max_per_source: 2,
            ..Limits::default()
        };
        let mut t1: SessionTable<()> = SessionTable::new(limits.clone(), total.clone());
        let mut t2: SessionTable<()> = SessionTable::new(limits, total.clone());
        let same_ip = |port| SocketAddr::from(([10, 9, 9, 9], port));
        t1.admit(&same_ip(1), 0).unwrap();
        let first = t1.insert(same_ip(1), 0, ());
        t1.admit(&same_ip(2), 0).unwrap();
        t1.insert(same_ip(2), 0, ());
        assert_eq!(t1.admit(&same_ip(3), 0), Err(Refusal::SourceFull));
        t1.admit(&peer(1), 0).unwrap();
        t1.insert(peer(1), 0, ());
        assert_eq!(t1.admit(&peer(2), 0), Err(Refusal::WorkerFull));
        t2.admit(&peer(3), 0).unwrap();
        t2.insert(peer(3), 0, ());
        assert_eq!(total.load(Ordering::Relaxed), 4);
        assert_eq!(t2.admit(&peer(4), 0), Err(Refusal::TotalFull));
        t1.remove(first);
        assert_eq!(total.load(Ordering::Relaxed), 3);
        assert!(t2.admit(&peer(4), 0).is_ok());
        assert_eq!(t1.admit(&same_ip(3), 0), Err(Refusal::TotalFull));
        assert_eq!(total.load(Ordering::Relaxed), 4, "t2 holds a reservation");
        drop(t2);
        assert_eq!(total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn new_session_rate_is_a_token_bucket() {
        let mut t = table(Limits {
            max_new_per_sec: 10,
            ..Limits::default()
        });
        let admitted = (0..20).filter(|&i| t.admit(&peer(i), 0).is_ok()).count();
        assert_eq!(admitted, 10, "a full bucket holds one second's worth");
        assert_eq!(t.admit(&peer(100), 50), Err(Refusal::RateLimited));
        assert!(t.admit(&peer(100), 100).is_ok(), "refills at 10/s");
        let later = (0..20)
            .filter(|&i| t.admit(&peer(200 + i), 10_000).is_ok())
            .count();
        assert_eq!(later, 10, "never more than one second's burst");
    }

    /// The new-session limit on a virtual clock, under bursts, steady demand and long quiet
    /// spells, at several rates. The bucket starts full at 0, holds at most `rate` tokens and
    /// gains `rate` per second, so for every window `[s, t]` ending at an attempt:
    /// - at most `rate + rate * (t - s)` sessions are admitted in it (seconds), so every
    ///   one-second window holds at most two seconds' worth and a long run `rate` per second;
    /// - an attempt is refused only if the window behind it already holds more than
    ///   `rate - 1 + rate * (t - s)`: no refusal while a token is due.
    ///
    /// Both bounds are checked at every attempt against the most loaded window behind it:
    /// `M = max(0, max over admitted i of (rate * t_i - i))`, a running maximum, stands for
    /// every window start at once (`s = 0`, the full bucket at start, is the 0).
    #[test]
    fn new_session_rate_holds_in_every_window_of_a_virtual_clock() {
        const EPS: f64 = 1e-6;
        for rate in [1u32, 7, 10, 250, 1000] {
            let mut t = table(Limits {
                max_new_per_sec: rate,
                ..Limits::default()
            });
            let r = f64::from(rate) / 1000.0; // tokens per millisecond
            let cap = f64::from(rate);
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(rate);
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let (mut now, mut admitted, mut refused) = (0u64, 0u64, 0u64);
            let mut most_loaded = 0.0f64;
            let mut quiet_at = 5_000;
            while now < 120_000 {
                if now >= quiet_at {
                    // Quiet for 1 to 3 s: the bucket fills to its cap, and no further.
                    now += 1_000 + next() % 2_000;
                    quiet_at = now + 5_000 + next() % 10_000;
                } else if next() % 10 >= 4 {
                    // Demand about 1.7 times the rate (the other attempts come in bursts,
                    // several in the same tick).
                    now += next() % (2_000 / u64::from(rate)).max(2);
                }
                let k = admitted as f64;
                let load = k - r * now as f64 + most_loaded;
                match t.admit(&peer(1), now) {
                    Ok(()) => {
                        // This admission is index k: the windows ending here, itself included.
                        most_loaded = most_loaded.max(r * now as f64 - k);
                        assert!(
                            k + 1.0 - r * now as f64 + most_loaded <= cap + EPS,
                            "rate {rate}: admission {admitted} at {now} ms overfills a window"
                        );
                        admitted += 1;
                    }
                    Err(refusal) => {
                        assert_eq!(refusal, Refusal::RateLimited);
                        assert!(
                            load > cap - 1.0 - EPS,
                            "rate {rate}: refused at {now} ms with a token due (load {load})"
                        );
                        refused += 1;
                    }
                }
            }
            // The run had both outcomes, and the long run kept to the rate.
            assert!(
                admitted > 0 && refused > 0,
                "rate {rate}: {admitted}/{refused}"
            );
            assert!(
                admitted as f64 <= cap + r * now as f64 + EPS,
                "rate {rate}: {admitted} in {now} ms"
            );
        }
    }
}
