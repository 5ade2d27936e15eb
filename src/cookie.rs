//! Stateless address validation (`--validate-peers`), in the way of QUIC Retry, DTLS
//! HelloVerifyRequest and TCP SYN cookies: a new peer is answered with a cookie that is a keyed
//! MAC of its address and a coarse timestamp; only a datagram carrying a valid cookie creates a
//! session or a socket. A flood from spoofed sources therefore costs no state: the spoofer
//! never sees the cookie.
//!
//! Wire format (udpring's own; clients that want sessions implement it):
//! - Retry, server to client: `"URETRY01"` (8 bytes) then the 24-byte cookie.
//! - Client to server: `"UCOOKI01"` (8 bytes), the cookie, then the real payload. The server
//!   strips a valid prefix from any datagram of the session; the client repeats it until it
//!   gets an answer that is not a Retry.
//! - Cookie: key epoch (u32, big-endian), seconds timestamp (u32, big-endian), then 16 bytes
//!   of SipHash-2-4-128 over (epoch, timestamp, peer address), keyed with the epoch's key.
//!
//! Keys rotate every `rotation`: the key of epoch `e` is SipHash of `e` under a random master
//! secret made at start-up, so every worker derives the same keys with no shared mutable
//! state, and rotation needs no coordination. Cookies are accepted from the current and the
//! previous epoch, and for at most `lifetime`.

use std::hash::Hasher;
use std::net::SocketAddr;

use siphasher::sip128::{Hasher128, SipHasher24};

/// The first bytes of a Retry datagram (the server's answer carrying a cookie).
pub const RETRY_MAGIC: &[u8; 8] = b"URETRY01";
/// The first bytes of a datagram that carries a cookie before its payload.
pub const COOKIE_MAGIC: &[u8; 8] = b"UCOOKI01";
/// Length of a cookie in bytes.
pub const COOKIE_LEN: usize = 24;
/// Length of a Retry datagram and of the prefix a client puts before its payload.
pub const PREFIX_LEN: usize = 8 + COOKIE_LEN;

/// Why a cookie was not accepted. Each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieError {
    /// The MAC does not match this peer (forged, altered, or minted for another address).
    Forged,
    /// Older than `lifetime`, or from a key epoch no longer accepted.
    Expired,
    /// Already used to open a session.
    Replayed,
}

/// Mints and checks cookies.
#[derive(Clone)]
pub struct CookieJar {
    master: (u64, u64),
    rotation_secs: u32,
    lifetime_secs: u32,
}

impl CookieJar {
    /// `master` must be secret and random (see `crate::sys::random_key`).
    pub fn new(master: [u8; 16], rotation_secs: u32, lifetime_secs: u32) -> CookieJar {
        let k0 = u64::from_le_bytes(master[..8].try_into().unwrap_or_default());
        let k1 = u64::from_le_bytes(master[8..].try_into().unwrap_or_default());
        CookieJar {
            master: (k0, k1),
            rotation_secs: rotation_secs.max(1),
            lifetime_secs: lifetime_secs.max(1),
        }
    }

    fn epoch(&self, now_secs: u32) -> u32 {
        now_secs / self.rotation_secs
    }

    fn key(&self, epoch: u32) -> (u64, u64) {
        let mut h = SipHasher24::new_with_keys(self.master.0, self.master.1);
        h.write(b"udpring cookie key");
        h.write_u32(epoch);
        let out = h.finish128();
        (out.h1, out.h2)
    }

    fn mac(&self, epoch: u32, timestamp: u32, peer: &SocketAddr) -> [u8; 16] {
        let (k0, k1) = self.key(epoch);
        let mut h = SipHasher24::new_with_keys(k0, k1);
        h.write_u32(epoch);
        h.write_u32(timestamp);
        match peer {
            SocketAddr::V4(a) => {
                h.write_u8(4);
                h.write(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                h.write_u8(6);
                h.write(&a.ip().octets());
            }
        }
        h.write_u16(peer.port());
        h.finish128().as_bytes()
    }

    /// A cookie for `peer` at `now_secs`.
    pub fn mint(&self, peer: &SocketAddr, now_secs: u32) -> [u8; COOKIE_LEN] {
        let epoch = self.epoch(now_secs);
        let mut out = [0u8; COOKIE_LEN];
        out[..4].copy_from_slice(&epoch.to_be_bytes());
        out[4..8].copy_from_slice(&now_secs.to_be_bytes());
        out[8..].copy_from_slice(&self.mac(epoch, now_secs, peer));
        out
    }

    /// Checks `cookie` for `peer` at `now_secs`.
    pub fn check(
        &self,
        peer: &SocketAddr,
        cookie: &[u8; COOKIE_LEN],
        now_secs: u32,
    ) -> Result<(), CookieError> {
        let epoch = u32::from_be_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        let timestamp = u32::from_be_bytes([cookie[4], cookie[5], cookie[6], cookie[7]]);
        let current = self.epoch(now_secs);
        // Only the current and previous keys exist; anything else cannot be verified, and a
        // timestamp must belong to the epoch it names.
        if epoch > current || current - epoch > 1 || self.epoch(timestamp) != epoch {
            return Err(CookieError::Expired);
        }
        if !constant_time_eq(&self.mac(epoch, timestamp, peer), &cookie[8..]) {
            return Err(CookieError::Forged);
        }
        if timestamp > now_secs.saturating_add(2)
            || now_secs - timestamp.min(now_secs) > self.lifetime_secs
        {
            return Err(CookieError::Expired);
        }
        Ok(())
    }

    /// The tag that identifies a cookie for replay detection.
    pub fn tag(cookie: &[u8; COOKIE_LEN]) -> [u8; 16] {
        let mut t = [0u8; 16];
        t.copy_from_slice(&cookie[8..]);
        t
    }
}

/// A Retry datagram carrying `cookie`.
pub fn retry_message(cookie: &[u8; COOKIE_LEN]) -> [u8; PREFIX_LEN] {
    let mut out = [0u8; PREFIX_LEN];
    out[..8].copy_from_slice(RETRY_MAGIC);
    out[8..].copy_from_slice(cookie);
    out
}

/// Splits a client datagram into its cookie and payload when it starts with the cookie magic.
pub fn split_cookie(datagram: &[u8]) -> Option<(&[u8; COOKIE_LEN], &[u8])> {
    if datagram.len() < PREFIX_LEN || &datagram[..8] != COOKIE_MAGIC {
        return None;
    }
    let cookie = datagram[8..PREFIX_LEN].try_into().ok()?;
    Some((cookie, &datagram[PREFIX_LEN..]))
}

/// Reads a Retry datagram (for clients).
pub fn parse_retry(datagram: &[u8]) -> Option<[u8; COOKIE_LEN]> {
    if datagram.len() != PREFIX_LEN || &datagram[..8] != RETRY_MAGIC {
        return None;
    }
    datagram[8..].try_into().ok()
}

/// Prefixes `payload` with `cookie` (for clients).
pub fn with_cookie(cookie: &[u8; COOKIE_LEN], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + payload.len());
    out.extend_from_slice(COOKIE_MAGIC);
    out.extend_from_slice(cookie);
    out.extend_from_slice(payload);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Cookies already used to open a session, with their key epoch. A cookie proves an address
/// once: a replayed one (an attacker who saw it, or a duplicate) opens nothing. Epochs older
/// than the previous one are pruned, since their cookies no longer validate anyway.
#[derive(Default)]
pub(crate) struct UsedCookies {
    tags: std::collections::HashMap<[u8; 16], u32>,
    pruned_epoch: u32,
}

impl UsedCookies {
    /// Records `tag`; `false` when it was already there (a replay).
    pub(crate) fn first_use(&mut self, tag: [u8; 16], epoch: u32) -> bool {
        if epoch > self.pruned_epoch + 1 {
            self.tags.retain(|_, e| *e + 1 >= epoch);
            self.pruned_epoch = epoch.saturating_sub(1);
        }
        self.tags.insert(tag, epoch).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jar() -> CookieJar {
        CookieJar::new([7u8; 16], 60, 120)
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_fresh_cookie_validates_for_its_peer_only() {
        let j = jar();
        let c = j.mint(&peer("10.0.0.1:5000"), 1000);
        assert_eq!(j.check(&peer("10.0.0.1:5000"), &c, 1000), Ok(()));
        assert_eq!(j.check(&peer("10.0.0.1:5000"), &c, 1030), Ok(()));
        assert_eq!(
            j.check(&peer("10.0.0.1:5001"), &c, 1000),
            Err(CookieError::Forged)
        );
        assert_eq!(
            j.check(&peer("10.0.0.2:5000"), &c, 1000),
            Err(CookieError::Forged)
        );
        let v6 = j.mint(&peer("[2001:db8::1]:53"), 1000);
        assert_eq!(j.check(&peer("[2001:db8::1]:53"), &v6, 1000), Ok(()));
    }

    #[test]
    fn any_altered_bit_is_forged() {
        let j = jar();
        let p = peer("10.0.0.1:5000");
        let c = j.mint(&p, 1000);
        for byte in 8..COOKIE_LEN {
            let mut bad = c;
            bad[byte] ^= 1;
            assert_eq!(
                j.check(&p, &bad, 1000),
                Err(CookieError::Forged),
                "byte {byte}"
            );
        }
        // Changing the timestamp (within the epoch) breaks the MAC too.
        let mut bad = c;
        bad[7] ^= 1;
        assert!(j.check(&p, &bad, 1000).is_err());
    }

    #[test]
    fn keys_rotate_and_old_cookies_expire() {
        let j = jar();
        let p = peer("10.0.0.1:5000");
        let c = j.mint(&p, 1000); // epoch 16
        assert_eq!(
            j.check(&p, &c, 1079),
            Ok(()),
            "previous epoch still accepted"
        );
        assert_eq!(j.check(&p, &c, 1121), Err(CookieError::Expired), "lifetime");
        assert_eq!(
            j.check(&p, &c, 1200),
            Err(CookieError::Expired),
            "two epochs on"
        );
        // Another master secret: nothing validates.
        let other = CookieJar::new([8u8; 16], 60, 120);
        assert_eq!(other.check(&p, &c, 1000), Err(CookieError::Forged));
        // From the future.
        let future = j.mint(&p, 1100);
        assert_eq!(j.check(&p, &future, 1000), Err(CookieError::Expired));
    }

    #[test]
    fn framing_round_trips_and_rejects_garbage() {
        let j = jar();
        let c = j.mint(&peer("10.0.0.1:1"), 5);
        let retry = retry_message(&c);
        assert_eq!(parse_retry(&retry), Some(c));
        assert_eq!(parse_retry(&retry[..31]), None);
        let d = with_cookie(&c, b"hello");
        let (got, rest) = split_cookie(&d).unwrap();
        assert_eq!(got, &c);
        assert_eq!(rest, b"hello");
        assert!(split_cookie(b"UCOOKI01short").is_none());
        assert!(split_cookie(&[0u8; 64]).is_none());
        assert!(split_cookie(b"").is_none());
    }

    #[test]
    fn used_cookies_refuse_replays_and_prune_old_epochs() {
        let mut used = UsedCookies::default();
        assert!(used.first_use([1; 16], 5));
        assert!(!used.first_use([1; 16], 5), "replay");
        assert!(used.first_use([2; 16], 6));
        // Epoch 8 prunes every tag of an epoch before 7.
        assert!(used.first_use([3; 16], 8));
        assert!(
            used.first_use([1; 16], 5),
            "pruned: its cookie no longer validates anyway"
        );
    }
}
