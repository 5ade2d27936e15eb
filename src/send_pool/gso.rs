//! What send completions say about GSO, and what the pool does about it: trains off for the
//! pool on `EIO`, held back for one destination on `EINVAL` until a datagram to it goes
//! through (see [`SendPool::gso_evidence`]).

use super::{Completed, Dest, SendPool};
use crate::datagram::MAX_GSO_SEGMENTS;

/// The most destinations whose trains are held back at once (see [`SendPool::gso_evidence`]);
/// past it an arbitrary entry makes room, so the table stays small whatever the peers do.
const MAX_HELD_DESTINATIONS: usize = 1024;

/// What is known of a destination whose trains the kernel refused with `EINVAL`.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Hold {
    /// Trains to it wait (its replies go one by one).
    held: bool,
    /// Refusals with a confirmation (a datagram that went through) between them: at two, the
    /// hold is for good.
    refusals: u8,
}

/// What a send completion says about GSO ([`SendPool::gso_evidence`]), for the caller's
/// counters and log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoEvidence {
    /// Nothing about GSO: a success, or an error that is not the train's.
    Nothing,
    /// `EIO` to a train: the kernel or the device cannot segment. GSO is off for the pool
    /// from now on (reported once, when it goes off).
    Disabled,
    /// `EIO` to a train pushed before GSO went off: refused like the first, nothing changes.
    RefusedWhileOff,
    /// `EINVAL` to a train: trains to this destination stop (its replies go one by one)
    /// until a datagram to it goes through; a second refusal after such a confirmation holds
    /// it for good (see [`SendPool::gso_evidence`]).
    DestinationHeld,
    /// A datagram to a held destination went through: trains to it resume.
    DestinationConfirmed,
}

impl SendPool {
    /// Whether GSO trains are in use.
    #[cfg(test)]
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// How many datagrams of `segment` bytes one ready-made train to `dest`
    /// ([`SendOptions::segment_size`]) can carry if it is queued now, at most 64. The train
    /// is written into one slot either way, so never more than a slot holds; where trains
    /// cannot go to `dest` (GSO off, or `dest` held) it is then spread over a slot per
    /// datagram, so also never more than slots are free. 0 when no slot is free. A transport
    /// stack that builds no more than this never has a train refused for want of room.
    pub fn train_room(&self, dest: &Dest, segment: usize) -> usize {
        if self.free.is_empty() {
            return 0;
        }
        let mut room = (self.slot_capacity / segment.max(1)).max(1);
        if !self.trains_to(dest) {
            room = room.min(self.free.len());
        }
        room.min(MAX_GSO_SEGMENTS)
    }

    /// Whether replies to `dest` may travel as a GSO train now.
    pub fn trains_to(&self, dest: &Dest) -> bool {
        self.gso && (self.held.is_empty() || !matches!(self.held.get(dest), Some(h) if h.held))
    }

    /// Weighs what the completion of `done` (its `result`, a negated errno on failure) says
    /// about GSO, and acts on it:
    /// - `EIO` to a train: the kernel refuses to segment for this socket or device
    ///   (`udp_send_skb`: no checksum offload, UDP-Lite, IPsec); GSO goes off at once.
    /// - `EINVAL` to a train: also what a destination of its own earns (a segment larger than
    ///   the route's MTU, a port 0), so one destination never turns GSO off for everyone:
    ///   trains to that destination stop until a lone datagram to it goes through.
    /// - A datagram to a held destination going through (a lone one, as its replies go while
    ///   it is held): trains to it resume, once. A destination whose trains are refused again
    ///   after that (lone datagrams go through, trains never: a socket with `SO_NO_CHECK`, a
    ///   path that drops GSO) stays held for good, so that it loses at most two trains.
    /// - Anything else (a lone datagram's error, `ENOBUFS`, `EPERM`, `ECONNREFUSED`, ...):
    ///   nothing about GSO.
    pub fn gso_evidence(&mut self, done: &Completed, result: i32) -> GsoEvidence {
        if result >= 0 {
            // Went through: whatever was refused before, this destination takes datagrams.
            if !self.held.is_empty() {
                if let Some(h) = self.held.get_mut(&done.dest) {
                    if h.held && h.refusals < 2 {
                        h.held = false;
                        return GsoEvidence::DestinationConfirmed;
                    }
                }
            }
            return GsoEvidence::Nothing;
        }
        if done.segments <= 1 {
            return GsoEvidence::Nothing;
        }
        match -result {
            libc::EIO if !self.gso => GsoEvidence::RefusedWhileOff,
            libc::EIO => {
                self.gso = false;
                self.held.clear();
                GsoEvidence::Disabled
            }
            libc::EINVAL => {
                if self.held.len() >= MAX_HELD_DESTINATIONS && !self.held.contains_key(&done.dest) {
                    // Bounded: one entry makes room (its trains are tried again, and held
                    // again if refused again).
                    if let Some(&any) = self.held.keys().next() {
                        self.held.remove(&any);
                    }
                }
                let h = self.held.entry(done.dest).or_default();
                // A train pushed before the hold began, refused like the first, is no new
                // evidence: only a refusal after a confirmation counts again.
                if !h.held {
                    h.refusals = h.refusals.saturating_add(1);
                }
                h.held = true;
                GsoEvidence::DestinationHeld
            }
            _ => GsoEvidence::Nothing,
        }
    }
}
