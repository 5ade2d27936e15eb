//! Which session a datagram belongs to: a sans-IO decision from the session table, the
//! cross-worker directory and the cookie gate. It makes no system call and calls no handler;
//! the worker carries the decision out (opens the socket, calls the handler, forwards, sends
//! the Retry), so the rules are unit-tested here with plain values and a virtual clock.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cookie::{self, CookieError, CookieJar};
use crate::send_pool::Dest;
use crate::session::{Millis, SessionId, SessionTable};
use crate::stats::Stats;

use crate::shared::ServerShared;

/// Where a datagram was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The worker's listening socket, or a per-client socket that was closing (its queue is
    /// routed as if it had reached the listener).
    Listener,
    /// Session `id`'s own socket.
    Session(SessionId),
    /// Another worker received it for a peer this worker owns.
    Forwarded,
}

/// A session's own socket.
pub(super) struct SessionSock {
    pub fd: OwnedFd,
    pub recv_armed: bool,
    /// Counted against `--max-connected`.
    pub connected: bool,
}

/// What the worker keeps per session.
pub(super) struct SessionEntry<S> {
    /// `None` only between insertion and `session_open` returning.
    pub state: Option<S>,
    pub sock: Option<SessionSock>,
    /// Shared with session handles; set when the session closes.
    pub closed: Option<Arc<AtomicBool>>,
    /// The local address the session's first datagram arrived on.
    pub local: Option<IpAddr>,
    /// The peer proved its address with a cookie: no anti-amplification limit.
    pub validated: bool,
    /// Bytes that may still be sent to an unvalidated peer.
    pub budget: u64,
}

impl<S> SessionEntry<S> {
    /// Where replies to this session go: its own socket (connected: no address), or the
    /// worker's socket with the peer's address and the local address it asked on.
    pub(super) fn dest(&self, peer: SocketAddr, listener_fd: RawFd, local: Option<IpAddr>) -> Dest {
        match &self.sock {
            Some(sock) => Dest {
                fd: sock.fd.as_raw_fd(),
                peer,
                local: None,
                connected: true,
            },
            None => Dest {
                fd: listener_fd,
                peer,
                local: local.or(self.local),
                connected: false,
            },
        }
    }
}

/// The decision for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Deliver to this session, without its first `strip` bytes (a cookie prefix).
    Session { id: SessionId, strip: usize },
    /// No session: open one (admission is the worker's next check), then deliver.
    Open { validated: bool, strip: usize },
    /// Another worker owns the peer (connected mode with several workers).
    Forward(usize),
    /// `--validate-peers` and no valid cookie: answer with a Retry carrying one.
    Retry,
    /// Counted and dropped (a forged cookie).
    Drop,
}

/// The routing rules of one worker, and the session table they route by.
pub(super) struct Router<S> {
    sessions: SessionTable<SessionEntry<S>>,
    worker: usize,
}

impl<S> Router<S> {
    pub fn new(sessions: SessionTable<SessionEntry<S>>, worker: usize) -> Router<S> {
        Router { sessions, worker }
    }

    /// The session table (opening, closing and expiry are the worker's, in `sessions`).
    pub fn table(&self) -> &SessionTable<SessionEntry<S>> {
        &self.sessions
    }

    pub fn table_mut(&mut self) -> &mut SessionTable<SessionEntry<S>> {
        &mut self.sessions
    }

    /// Routes a datagram from `peer` that arrived through `source`.
    pub fn route(
        &mut self,
        source: Source,
        peer: SocketAddr,
        payload: &[u8],
        now: Millis,
        server: &ServerShared,
        stats: &mut Stats,
    ) -> Route {
        if let Source::Session(id) = source {
            match self.sessions.get(id) {
                // Established: the kernel picked this session's socket by its 4-tuple.
                Some(e) if e.peer == peer => {
                    return Route::Session {
                        id,
                        strip: cookie_strip(server, peer, payload, now),
                    }
                }
                // Read from a per-client socket but sent by someone else (the bind/connect
                // window): route it as if it had reached the listener. Nothing is dropped and
                // nothing reaches the wrong session.
                Some(_) => stats.strays += 1,
                // The session has just closed: its peer gets a new one.
                None => {}
            }
        }
        if let Some(id) = self.sessions.lookup(&peer) {
            return Route::Session {
                id,
                strip: cookie_strip(server, peer, payload, now),
            };
        }
        if let Some(directory) = &server.directory {
            if let Err(owner) = directory.claim(peer, self.worker) {
                return Route::Forward(owner);
            }
        }
        let route = cookie_gate(server, peer, payload, now, stats);
        if !matches!(route, Route::Open { .. }) {
            self.abandon(peer, server);
        }
        route
    }

    /// The worker could not open the session `route` asked for: give up the peer's claim.
    pub fn abandon(&self, peer: SocketAddr, server: &ServerShared) {
        if let Some(directory) = &server.directory {
            directory.release(&peer, self.worker);
        }
    }
}

/// With `--validate-peers`, a peer without a session must show a valid cookie, used once,
/// before any state exists for it; otherwise it gets a Retry carrying one and nothing else.
fn cookie_gate(
    server: &ServerShared,
    peer: SocketAddr,
    payload: &[u8],
    now: Millis,
    stats: &mut Stats,
) -> Route {
    let Some(jar) = server.cookies.as_ref() else {
        return Route::Open {
            validated: false,
            strip: 0,
        };
    };
    let now_secs = (now / 1000) as u32;
    match cookie::split_cookie(payload).map(|(c, _)| (*c, jar.check(&peer, c, now_secs))) {
        None => Route::Retry,
        Some((_, Err(CookieError::Forged))) => {
            stats.cookies_forged += 1;
            Route::Drop
        }
        Some((_, Err(_))) => {
            stats.cookies_expired += 1;
            Route::Retry
        }
        Some((c, Ok(()))) => {
            let epoch = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            if server
                .used_cookies
                .lock()
                .first_use(CookieJar::tag(&c), epoch)
            {
                stats.cookies_accepted += 1;
                Route::Open {
                    validated: true,
                    strip: cookie::PREFIX_LEN,
                }
            } else {
                stats.cookies_replayed += 1;
                Route::Retry
            }
        }
    }
}

/// A validated peer may keep prefixing its cookie (it cannot know when its session was
/// opened); strip a valid one so the handler sees the same payload either way.
fn cookie_strip(server: &ServerShared, peer: SocketAddr, payload: &[u8], now: Millis) -> usize {
    let Some(jar) = server.cookies.as_ref() else {
        return 0;
    };
    let now_secs = (now / 1000) as u32;
    match cookie::split_cookie(payload) {
        Some((c, _)) if jar.check(&peer, c, now_secs).is_ok() => cookie::PREFIX_LEN,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;
    use crate::session::Limits;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    fn server(cookies: bool, directory: bool) -> ServerShared {
        ServerShared {
            workers: Vec::new(),
            directory: directory.then(Directory::default),
            sessions_total: Arc::new(AtomicUsize::new(0)),
            connected_total: AtomicUsize::new(0),
            cookies: cookies.then(|| CookieJar::new([7; 16], 60, 120)),
            used_cookies: Default::default(),
            started: Instant::now(),
        }
    }

    fn router(worker: usize, server: &ServerShared) -> Router<u32> {
        Router::new(
            SessionTable::new(Limits::default(), server.sessions_total.clone()),
            worker,
        )
    }

    fn entry(v: u32) -> SessionEntry<u32> {
        SessionEntry {
            state: Some(v),
            sock: None,
            closed: None,
            local: None,
            validated: false,
            budget: 0,
        }
    }

    const A: &str = "192.0.2.1:1000";
    const B: &str = "192.0.2.2:2000";

    #[test]
    fn new_peers_open_known_peers_route_strays_are_rerouted() {
        let server = server(false, false);
        let mut r = router(0, &server);
        let mut stats = Stats::default();
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        let open = r.route(Source::Listener, a, b"x", 0, &server, &mut stats);
        assert_eq!(
            open,
            Route::Open {
                validated: false,
                strip: 0
            }
        );
        let id_a = r.sessions.insert(a, 0, entry(1));
        let to_a = Route::Session { id: id_a, strip: 0 };
        assert_eq!(
            r.route(Source::Listener, a, b"x", 5, &server, &mut stats),
            to_a
        );
        assert_eq!(
            r.route(Source::Session(id_a), a, b"x", 5, &server, &mut stats),
            to_a
        );
        // B's datagram read from A's socket (the bind/connect window) goes to B, counted.
        let stray = r.route(Source::Session(id_a), b, b"x", 5, &server, &mut stats);
        assert!(matches!(stray, Route::Open { .. }));
        assert_eq!(stats.strays, 1);
        // A closed session's late datagram opens a new one for its peer.
        r.sessions.remove(id_a);
        let late = r.route(Source::Session(id_a), a, b"x", 9, &server, &mut stats);
        assert!(matches!(late, Route::Open { .. }));
        assert_eq!(stats.strays, 1);
    }

    #[test]
    fn the_directory_forwards_peers_other_workers_own() {
        let server = server(false, true);
        let mut r0 = router(0, &server);
        let mut r1 = router(1, &server);
        let mut stats = Stats::default();
        let a = A.parse().unwrap();
        assert!(matches!(
            r0.route(Source::Listener, a, b"x", 0, &server, &mut stats),
            Route::Open { .. }
        ));
        assert_eq!(
            r1.route(Source::Listener, a, b"x", 0, &server, &mut stats),
            Route::Forward(0)
        );
        // Worker 0 could not open it (refused): the claim is released.
        r0.abandon(a, &server);
        assert!(matches!(
            r1.route(Source::Listener, a, b"x", 0, &server, &mut stats),
            Route::Open { .. }
        ));
    }

    #[test]
    fn the_cookie_gate_opens_once_per_valid_cookie() {
        let server = server(true, false);
        let mut r = router(0, &server);
        let mut stats = Stats::default();
        let a: SocketAddr = A.parse().unwrap();
        let now: Millis = 10_000;
        assert_eq!(
            r.route(Source::Listener, a, b"hello", now, &server, &mut stats),
            Route::Retry
        );
        let jar = server.cookies.as_ref().unwrap();
        let good = cookie::with_cookie(&jar.mint(&a, 10), b"hello");
        assert_eq!(
            r.route(Source::Listener, a, &good, now, &server, &mut stats),
            Route::Open {
                validated: true,
                strip: cookie::PREFIX_LEN
            }
        );
        assert_eq!(stats.cookies_accepted, 1);
        // The same cookie again (a replay) opens nothing.
        assert_eq!(
            r.route(Source::Listener, a, &good, now, &server, &mut stats),
            Route::Retry
        );
        assert_eq!(stats.cookies_replayed, 1);
        // Another peer's cookie is forged for this one.
        let b: SocketAddr = B.parse().unwrap();
        assert_eq!(
            r.route(Source::Listener, b, &good, now, &server, &mut stats),
            Route::Drop
        );
        assert_eq!(stats.cookies_forged, 1);
        // Once open, a valid cookie prefix is stripped, and no prefix is fine too.
        let id = r.sessions.insert(a, now, entry(1));
        assert_eq!(
            r.route(Source::Listener, a, &good, now, &server, &mut stats),
            Route::Session {
                id,
                strip: cookie::PREFIX_LEN
            }
        );
        assert_eq!(
            r.route(Source::Listener, a, b"plain", now, &server, &mut stats),
            Route::Session { id, strip: 0 }
        );
    }
}
