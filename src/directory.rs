//! Which worker owns which peer, for `--sessions connected` with several workers.
//!
//! Per-client sockets join and leave the port's SO_REUSEPORT group as they are bound and
//! connected, so the kernel's choice of listener for a given peer is not stable while sessions
//! are being set up: two workers can each see a first datagram from the same new peer. The
//! first to claim the peer here owns its session; the other forwards what it received. Only
//! datagrams that reach a listener (new peers and strays) look here; established traffic goes
//! straight to its connected socket and never takes these locks.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;

use parking_lot::Mutex;

const SHARDS: usize = 64;

pub struct Directory {
    shards: Box<[Mutex<HashMap<SocketAddr, usize>>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl Directory {
    fn shard(&self, peer: &SocketAddr) -> &Mutex<HashMap<SocketAddr, usize>> {
        &self.shards[self.hasher.hash_one(peer) as usize % SHARDS]
    }

    /// Claims `peer` for `worker`. `Err(owner)` when another worker already owns it.
    pub fn claim(&self, peer: SocketAddr, worker: usize) -> Result<(), usize> {
        let mut shard = self.shard(&peer).lock();
        match shard.get(&peer) {
            Some(&owner) if owner != worker => Err(owner),
            _ => {
                shard.insert(peer, worker);
                Ok(())
            }
        }
    }

    /// Releases `peer` if `worker` owns it.
    pub fn release(&self, peer: &SocketAddr, worker: usize) {
        let mut shard = self.shard(peer).lock();
        if shard.get(peer) == Some(&worker) {
            shard.remove(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_wins_until_released() {
        let d = Directory::default();
        let p: SocketAddr = "10.0.0.1:5".parse().unwrap();
        assert_eq!(d.claim(p, 0), Ok(()));
        assert_eq!(d.claim(p, 0), Ok(()));
        assert_eq!(d.claim(p, 1), Err(0));
        d.release(&p, 1); // not the owner: no effect
        assert_eq!(d.claim(p, 1), Err(0));
        d.release(&p, 0);
        assert_eq!(d.claim(p, 1), Ok(()));
    }
}
