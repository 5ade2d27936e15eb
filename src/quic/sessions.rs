//! TLS session resumption and 0-RTT: one session cache shared by every worker of a server,
//! and its hand-over to the process that takes the server over (`--takeover`).
//!
//! rustls accepts early data only with stateful resumption: a server with a ticketer
//! (`ProducesTickets::enabled()`) never accepts 0-RTT (`decide_if_early_data_allowed` in
//! rustls's `server/tls13.rs` requires `!ticketer.enabled()`; RFC 8446 section 8.1). So the
//! "ticket" a client gets is a random 32-byte ID and the session's secrets stay here, in one
//! [`SessionCache`] every worker's rustls configuration points at: a ticket one worker issued
//! resumes on any other. `take` removes an entry as it is used, so a ticket is good for one
//! resumption and a replayed ClientHello's early data is refused (each handshake issues two
//! fresh tickets). The cache is bounded (`capacity` entries of at most [`MAX_VALUE`] bytes,
//! the oldest evicted first) and an entry expires `lifetime` after it was stored: that is the
//! rotation, and an expired or evicted ticket means a full handshake, nothing worse.
//!
//! Across `--takeover` the old process exports the cache ([`SessionCache::export`]) and the
//! new one imports it ([`SessionCache::import`]) before it serves, so clients holding the old
//! process's tickets resume (with 0-RTT) against the new one. The format is versioned and
//! every length is checked before anything is read or stored. Secrets are never logged.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The ID length rustls gives a stateful ticket (`rand::random_vec(.., 32)` in `emit_ticket`).
pub const TICKET_ID_LEN: usize = 32;
/// The largest session value kept: rustls's encoding is about 100 bytes plus the SNI and ALPN
/// (at most 255 each); anything larger is not stored (the client gets no ticket).
pub const MAX_VALUE: usize = 1024;
/// The export format's first bytes: name and version.
const MAGIC: &[u8; 20] = b"udpring-sessions/1\n\0";
/// Per entry in the export: expiry (8), ID length (1), value length (2).
const ENTRY_HEADER: usize = 8 + 1 + 2;

thread_local! {
    /// Set when this thread's `take` found a session: read by the handler around the call
    /// that feeds a ClientHello to rustls (`Endpoint::accept` runs it on this thread).
    static RESUMED: Cell<bool> = const { Cell::new(false) };
}

/// Clears this thread's "a session was taken" flag (before a ClientHello is processed).
pub(crate) fn clear_resumed() {
    RESUMED.with(|r| r.set(false));
}

/// Whether a session was taken on this thread since [`clear_resumed`]: the ClientHello just
/// processed presented a live ticket of this server (rustls then resumes unless the ticket's
/// age, cipher suite or SNI disagree, which our own clients' tickets do not).
pub(crate) fn take_resumed() -> bool {
    RESUMED.with(|r| r.replace(false))
}

/// Whether this server connection accepted the client's 0-RTT data (quinn-proto's
/// `has_0rtt`: on a server it is set when rustls accepted early data, at the first Initial;
/// its `accepted_0rtt` is meaningful for clients only). Stream data read from such a
/// connection while it [`is_handshaking`](quinn_proto::Connection::is_handshaking) arrived as
/// early data ([`is_early_data`]): replayable, so an application answers only what is safe to
/// repeat (HTTP/3: GET and HEAD).
pub fn accepted_0rtt(conn: &quinn_proto::Connection) -> bool {
    conn.side().is_server() && conn.has_0rtt()
}

/// Whether data read from `conn` now arrived as 0-RTT data: 0-RTT was accepted and the
/// handshake is not complete (until the client's Finished arrives, a server can decrypt no
/// 1-RTT packet, so every stream byte it has is early data).
pub fn is_early_data(conn: &quinn_proto::Connection) -> bool {
    accepted_0rtt(conn) && conn.is_handshaking()
}

struct Entry {
    value: Vec<u8>,
    /// Seconds since the Unix epoch (wall clock: an export crosses to another process).
    expires: u64,
    /// The key in `CacheInner::order`.
    seq: u64,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<Vec<u8>, Entry>,
    /// Insertion order (oldest first), for eviction.
    order: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
}

impl CacheInner {
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.seq);
        Some(entry)
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>, expires: u64, capacity: usize) {
        self.remove(&key);
        while self.entries.len() >= capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                expires,
                seq,
            },
        );
    }
}

/// The sessions of every worker of one server (see the module docs).
pub struct SessionCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
    lifetime: Duration,
}

impl fmt::Debug for SessionCache {
    /// Counts only: the values are session secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Why an export was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError(pub String);

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ImportError {}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SessionCache {
    /// A cache of at most `capacity` sessions, each kept `lifetime` at most.
    pub fn new(capacity: usize, lifetime: Duration) -> SessionCache {
        SessionCache {
            inner: Mutex::new(CacheInner::default()),
            capacity,
            lifetime,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic while the lock was held leaves a map that is still consistent entry by
        // entry (each operation finishes its own insert or remove before the next can run).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions held (expired ones included until they are looked up or evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put_at(&self, key: Vec<u8>, value: Vec<u8>, now: u64) -> bool {
        if self.capacity == 0 || key.is_empty() || key.len() > 255 || value.len() > MAX_VALUE {
            return false;
        }
        let expires = now.saturating_add(self.lifetime.as_secs());
        self.lock().insert(key, value, expires, self.capacity);
        true
    }

    fn take_at(&self, key: &[u8], now: u64) -> Option<Vec<u8>> {
        let entry = self.lock().remove(key)?;
        (entry.expires > now).then_some(entry.value)
    }

    /// The live sessions in the hand-over format, newest first, at most `limit_bytes` long
    /// (older sessions beyond it are left out: their clients make a full handshake).
    pub fn export(&self, limit_bytes: usize) -> Vec<u8> {
        self.export_at(limit_bytes, unix_now())
    }

    fn export_at(&self, limit_bytes: usize, now: u64) -> Vec<u8> {
        let mut out = Vec::new();
        if limit_bytes < MAGIC.len() + 4 {
            return out;
        }
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0; 4]);
        let mut count: u32 = 0;
        let inner = self.lock();
        for key in inner.order.values().rev() {
            let Some(entry) = inner.entries.get(key) else {
                continue;
            };
            let size = ENTRY_HEADER + key.len() + entry.value.len();
            if entry.expires <= now || out.len() + size > limit_bytes {
                continue;
            }
            out.extend_from_slice(&entry.expires.to_be_bytes());
            // Both bounded when stored (put_at, import_at).
            out.push(key.len() as u8);
            out.extend_from_slice(&(entry.value.len() as u16).to_be_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&entry.value);
            count += 1;
        }
        out[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&count.to_be_bytes());
        out
    }

    /// Takes the sessions of an [`export`](Self::export) (another process's: nothing in it is
    /// trusted). The whole export is parsed and every length checked before any entry is
    /// stored; expired entries are skipped, and at most `capacity` are kept (the newest).
    /// Returns how many were stored.
    pub fn import(&self, data: &[u8]) -> Result<usize, ImportError> {
        self.import_at(data, unix_now())
    }

    fn import_at(&self, data: &[u8], now: u64) -> Result<usize, ImportError> {
        let bad = |why: String| ImportError(format!("session export refused: {why}"));
        let Some(rest) = data.strip_prefix(&MAGIC[..]) else {
            return Err(bad("not in the udpring-sessions/1 format".into()));
        };
        let (count, mut rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("cut short before its count".into()))?;
        let count = u32::from_be_bytes(*count) as usize;
        // Each entry takes at least ENTRY_HEADER + 1 bytes: a count the data cannot hold is
        // refused before anything is sized from it.
        if count > rest.len() / (ENTRY_HEADER + 1) {
            return Err(bad(format!(
                "claims {count} sessions in {} bytes",
                rest.len()
            )));
        }
        let mut parsed = Vec::with_capacity(count.min(self.capacity));
        for i in 0..count {
            let (header, tail) = rest
                .split_first_chunk::<ENTRY_HEADER>()
                .ok_or_else(|| bad(format!("session {i} cut short in its header")))?;
            let expires = u64::from_be_bytes(header[..8].try_into().expect("8 of 11 bytes"));
            let key_len = usize::from(header[8]);
            let value_len = usize::from(u16::from_be_bytes([header[9], header[10]]));
            if key_len == 0 || value_len > MAX_VALUE {
                return Err(bad(format!(
                    "session {i} has an ID of {key_len} bytes and a value of {value_len} (1..=255 and at most {MAX_VALUE})"
                )));
            }
            if tail.len() < key_len + value_len {
                return Err(bad(format!("session {i} cut short")));
            }
            let (key, tail) = tail.split_at(key_len);
            let (value, tail) = tail.split_at(value_len);
            rest = tail;
            // Newest first in the export: those past capacity are the oldest.
            if expires > now && parsed.len() < self.capacity {
                parsed.push((key.to_vec(), value.to_vec(), expires));
            }
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last session", rest.len())));
        }
        let stored = parsed.len();
        let mut inner = self.lock();
        // Oldest first, so that eviction order stays oldest-first.
        for (key, value, expires) in parsed.into_iter().rev() {
            inner.insert(key, value, expires, self.capacity);
        }
        Ok(stored)
    }
}

impl rustls::server::StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_at(key, value, unix_now())
    }

    /// rustls asks `get` only for TLS 1.2 session IDs, which a QUIC server never sees.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let now = unix_now();
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        (entry.expires > now).then(|| entry.value.clone())
    }

    /// One resumption per ticket (RFC 8446 section 8.1's single-use tickets: a replayed
    /// ClientHello finds nothing and its early data is refused).
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let value = self.take_at(key, unix_now());
        if value.is_some() {
            RESUMED.with(|r| r.set(true));
        }
        value
    }

    fn can_cache(&self) -> bool {
        self.capacity > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::StoresServerSessions;

    const HOUR: Duration = Duration::from_secs(3600);

    fn key(n: u8) -> Vec<u8> {
        vec![n; TICKET_ID_LEN]
    }

    #[test]
    fn a_session_resumes_once_and_expires() {
        let cache = SessionCache::new(8, HOUR);
        assert!(cache.put_at(key(1), b"one".to_vec(), 1000));
        assert_eq!(cache.take_at(&key(1), 1001), Some(b"one".to_vec()));
        assert_eq!(cache.take_at(&key(1), 1001), None, "single use");
        assert!(cache.put_at(key(2), b"two".to_vec(), 1000));
        assert_eq!(cache.take_at(&key(2), 1000 + 3600), None, "expired");
        assert!(cache.is_empty());
        assert!(!cache.put_at(key(3), vec![0; MAX_VALUE + 1], 1000));
        assert!(!SessionCache::new(0, HOUR).can_cache());
    }

    #[test]
    fn the_oldest_session_is_evicted_at_capacity() {
        let cache = SessionCache::new(2, HOUR);
        for n in 1..=3 {
            cache.put_at(key(n), vec![n], 1000);
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.take_at(&key(1), 1000), None);
        assert_eq!(cache.take_at(&key(3), 1000), Some(vec![3]));
        // A taken entry leaves no stale order behind: capacity counts live entries.
        cache.put_at(key(4), vec![4], 1000);
        cache.put_at(key(5), vec![5], 1000);
        assert_eq!(cache.take_at(&key(2), 1000), None, "evicted by 5");
        assert_eq!(cache.take_at(&key(4), 1000), Some(vec![4]));
    }

    #[test]
    fn the_taking_thread_is_told_a_session_resumed() {
        let cache = SessionCache::new(2, HOUR);
        cache.put(key(1), b"v".to_vec());
        clear_resumed();
        assert!(cache.take(&key(9)).is_none());
        assert!(!take_resumed());
        assert!(cache.take(&key(1)).is_some());
        assert!(take_resumed());
        assert!(!take_resumed(), "read once");
    }

    #[test]
    fn an_export_round_trips_newest_first_within_its_limits() {
        let old = SessionCache::new(8, HOUR);
        old.put_at(key(9), vec![9; 10], 5000 - 3600); // expired by 5000
        for n in 1..=4 {
            old.put_at(key(n), vec![n; 100], 5000 + u64::from(n));
        }
        let data = old.export_at(usize::MAX, 5000);
        let new = SessionCache::new(3, HOUR);
        assert_eq!(
            new.import_at(&data, 5000),
            Ok(3),
            "capacity keeps the newest"
        );
        assert_eq!(new.take_at(&key(1), 5000), None);
        assert_eq!(new.take_at(&key(9), 5000), None, "expired: not exported");
        for n in 2..=4 {
            assert_eq!(new.take_at(&key(n), 5000), Some(vec![n; 100]));
        }
        // A byte limit keeps the newest that fit.
        let one = MAGIC.len() + 4 + ENTRY_HEADER + TICKET_ID_LEN + 100;
        let data = old.export_at(one, 5000);
        assert_eq!(data.len(), one);
        let new = SessionCache::new(8, HOUR);
        assert_eq!(new.import_at(&data, 5000), Ok(1));
        assert_eq!(new.take_at(&key(4), 5000), Some(vec![4; 100]));
        // Expired by the time it is imported: skipped.
        let data = old.export_at(usize::MAX, 5000);
        assert_eq!(
            SessionCache::new(8, HOUR).import_at(&data, 5000 + 7200),
            Ok(0)
        );
    }

    #[test]
    fn a_bad_export_is_refused_whole() {
        let old = SessionCache::new(8, HOUR);
        old.put_at(key(1), vec![1; 50], 1000);
        old.put_at(key(2), vec![2; 50], 1000);
        let good = old.export_at(usize::MAX, 1000);
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (b"udpring-sessions/2\n\0\0\0\0\0".to_vec(), "format"),
            (good[..MAGIC.len() + 2].to_vec(), "before its count"),
            (good[..good.len() - 1].to_vec(), "cut short"),
            ([&good[..], b"x"].concat(), "after the last"),
        ];
        let mut huge = good.clone();
        huge[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push((huge, "claims 4294967295"));
        let mut long_value = good.clone();
        let at = MAGIC.len() + 4 + 9;
        long_value[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        cases.push((long_value, "value of 65535"));
        let mut no_key = good.clone();
        no_key[MAGIC.len() + 4 + 8] = 0;
        cases.push((no_key, "ID of 0 bytes"));
        for (data, why) in cases {
            let new = SessionCache::new(8, HOUR);
            let e = new.import_at(&data, 1000).expect_err(why);
            assert!(e.0.contains(why), "{why}: {e}");
            assert!(
                new.is_empty(),
                "{why}: nothing stored from a refused export"
            );
        }
    }

    #[test]
    fn debug_shows_no_secrets() {
        let cache = SessionCache::new(8, HOUR);
        cache.put_at(key(1), b"SECRET".to_vec(), 1000);
        let shown = format!("{cache:?}");
        assert!(
            shown.contains("len: 1") && !shown.contains("83, 69"),
            "{shown}"
        );
    }
}
