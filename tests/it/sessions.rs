//! Session modes end to end: replies per client, the connect race, deferred replies and idle
//! close through session handles, every admission limit, and every datagram in one counter
//! (idle close with descriptors back to their baseline is in `idle_close.rs`).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use parking_lot::Mutex;
use udpring::session::DeferredError;
use udpring::{
    Datagram, Reply, Server, ServerConfig, SessionHandle, SessionHandler, SessionInfo, SessionMode,
};

/// Replies `"<payload>#<n>"`, n = this session's datagram count: a reply can only be right
/// if every datagram of the peer reached the same session exactly once, in order.
struct Counting {
    mismatched: Arc<AtomicU64>,
}

impl SessionHandler for Counting {
    type State = (SocketAddr, u64);

    fn session_open(&mut self, info: &SessionInfo) -> Self::State {
        (info.peer, 0)
    }

    fn session_datagram(
        &mut self,
        state: &mut Self::State,
        d: &Datagram<'_>,
        reply: &mut Reply<'_>,
    ) {
        if d.peer != state.0 {
            self.mismatched.fetch_add(1, Ordering::Relaxed);
        }
        state.1 += 1;
        let mut out = d.payload.to_vec();
        out.extend_from_slice(format!("#{}", state.1).as_bytes());
        let _ = reply.send(&out);
    }
}

/// 1,000 clients, three rounds each; in port-per-client mode each client switches to the
/// address its first reply came from.
fn thousand_clients(mode: SessionMode) {
    if !kernel_supports_udpring() {
        return;
    }
    let mismatched = Arc::new(AtomicU64::new(0));
    let m = mismatched.clone();
    let server = start(session_config(mode, 2), move |_| Counting {
        mismatched: m.clone(),
    });
    let main = server.local_addr();
    let clients: Vec<UdpSocket> = (0..1000).map(|_| client_for(main)).collect();
    let mut targets = vec![main; clients.len()];
    let mut buf = [0u8; 128];
    // Clients take turns in groups of 100, each group waiting for its replies: at most 100
    // small datagrams (about 100 KiB of kernel memory) are in flight, under any socket's
    // receive buffer (at least net.core.rmem_default, 208 KiB), so none can be dropped and
    // every count below is exact. A lost datagram would be a bug, and fails the test.
    const GROUP: usize = 100;
    assert!(
        server.recv_buffer() >= 200 << 10,
        "the receive buffer ({} bytes) must hold {GROUP} datagrams",
        server.recv_buffer()
    );
    for round in 1..=3u64 {
        for first in (0..clients.len()).step_by(GROUP) {
            let group = first..(first + GROUP).min(clients.len());
            for i in group.clone() {
                clients[i]
                    .send_to(format!("c{i}").as_bytes(), targets[i])
                    .expect("send");
            }
            for i in group {
                let (n, from) = recv_within(&clients[i], &mut buf, WAIT).unwrap_or_else(|e| {
                    panic!(
                        "{mode:?}: client {i} round {round}: {e}; {}",
                        server.total_counters().summary()
                    )
                });
                assert_eq!(
                    std::str::from_utf8(&buf[..n]).expect("utf8"),
                    format!("c{i}#{round}"),
                    "{mode:?}: client {i}"
                );
                match mode {
                    SessionMode::PortPerClient => {
                        assert_ne!(from.port(), main.port(), "reply must come from a new port");
                        if round > 1 {
                            assert_eq!(from, targets[i], "the session keeps its port");
                        }
                        targets[i] = from;
                    }
                    _ => assert_eq!(from, main, "{mode:?}: reply from the listening address"),
                }
            }
        }
    }
    let c = sum(&server.shutdown().expect("shutdown"));
    assert_eq!(c.kernel_drops, 0, "{mode:?}: {}", c.summary());
    assert_eq!(c.sessions_opened, 1000, "{mode:?}");
    assert_eq!(c.closed_shutdown, 1000, "{mode:?}");
    assert_eq!(mismatched.load(Ordering::Relaxed), 0);
}

#[test]
fn shared_mode_serves_a_thousand_clients() {
    thousand_clients(SessionMode::Shared);
}

#[test]
fn connected_mode_serves_a_thousand_clients() {
    thousand_clients(SessionMode::Connected);
}

#[test]
fn port_per_client_mode_serves_a_thousand_clients() {
    thousand_clients(SessionMode::PortPerClient);
}

/// Many new clients, each blasting from its very first datagram, over two workers: every
/// datagram the server received is handled exactly once, by its own peer's session.
#[test]
fn connect_race_loses_nothing_and_misroutes_nothing() {
    if !kernel_supports_udpring() {
        return;
    }
    let seen: Arc<Mutex<HashMap<SocketAddr, Vec<u32>>>> = Arc::default();
    let mismatched = Arc::new(AtomicU64::new(0));
    struct Tally {
        seen: Arc<Mutex<HashMap<SocketAddr, Vec<u32>>>>,
        mismatched: Arc<AtomicU64>,
    }
    impl SessionHandler for Tally {
        type State = SocketAddr;
        fn session_open(&mut self, info: &SessionInfo) -> SocketAddr {
            info.peer
        }
        fn session_datagram(&mut self, peer: &mut SocketAddr, d: &Datagram<'_>, _: &mut Reply<'_>) {
            if d.peer != *peer {
                self.mismatched.fetch_add(1, Ordering::Relaxed);
            }
            let seq = u32::from_be_bytes(d.payload[..4].try_into().expect("4 bytes"));
            self.seen.lock().entry(d.peer).or_default().push(seq);
        }
    }
    let (s2, m2) = (seen.clone(), mismatched.clone());
    let server = start(session_config(SessionMode::Connected, 2), move |_| Tally {
        seen: s2.clone(),
        mismatched: m2.clone(),
    });
    let to = server.local_addr();
    const CLIENTS: usize = 400;
    const EACH: u32 = 25;
    // Four threads blast at once, each client interleaved with the others (every client's
    // datagram k before anyone's k+1), so first datagrams of new clients keep arriving while
    // per-client sockets of earlier ones are between bind() and connect().
    let blasters: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let clients: Vec<UdpSocket> = (0..CLIENTS / 4).map(|_| client_for(to)).collect();
                for seq in 0..EACH {
                    for c in &clients {
                        c.send_to(&seq.to_be_bytes(), to).expect("send");
                    }
                }
                clients
            })
        })
        .collect();
    let _clients: Vec<Vec<UdpSocket>> = blasters
        .into_iter()
        .map(|b| b.join().expect("blaster"))
        .collect();
    let sent = CLIENTS as u64 * u64::from(EACH);
    // The listening socket's queue may overflow under the blast: every datagram must be
    // handled or counted as a kernel drop. (A per-client socket receives at most 25 of its
    // peer's datagrams, far under its receive buffer, so drops happen only on the listener.)
    assert!(
        wait_until(WAIT, || arrived(&server.total_counters()) == sent),
        "sent {sent}: {}",
        server.total_counters().summary()
    );
    let total = sum(&server.shutdown().expect("shutdown"));
    let seen = seen.lock();
    let handled: usize = seen.values().map(|v| v.len()).sum();
    assert_eq!(mismatched.load(Ordering::Relaxed), 0, "misrouted datagrams");
    for (peer, seqs) in seen.iter() {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            seqs.len(),
            "{peer} had a datagram handled twice: {seqs:?}"
        );
    }
    assert_eq!(
        handled as u64,
        total.rx_datagrams,
        "every datagram received is handled exactly once: {}",
        total.summary()
    );
    assert_eq!(total.rx_datagrams + total.kernel_drops, sent);
    assert_eq!(
        total.sessions_opened,
        seen.len() as u64,
        "one session per peer that was heard: {}",
        total.summary()
    );
    eprintln!(
        "connect race: sent {sent}, handled {handled}, kernel drops {}, peers {}, strays {}, forwarded {}",
        total.kernel_drops,
        seen.len(),
        total.strays,
        total.forwarded
    );
}

/// Answers nothing itself: keeps a handle to each session (taken on its first datagram), for
/// the test to reply through from its own thread; closes the session on "bye".
struct Later {
    handles: Arc<Mutex<Vec<SessionHandle>>>,
}

impl SessionHandler for Later {
    type State = bool;
    fn session_open(&mut self, _: &SessionInfo) -> bool {
        false
    }
    fn session_datagram(&mut self, seen: &mut bool, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        if !*seen {
            *seen = true;
            let handle = reply.session_handle().expect("sessions are on");
            self.handles.lock().push(handle);
        }
        if d.payload == b"bye" {
            reply.close_session();
        }
    }
}

/// Waits for the first session's handle.
fn first_handle(handles: &Mutex<Vec<SessionHandle>>, what: &str) -> SessionHandle {
    assert!(
        wait_until(WAIT, || !handles.lock().is_empty()),
        "{what}: no session opened"
    );
    handles.lock()[0].clone()
}

/// A reply posted from another thread while the worker waits reaches the peer from its
/// session's address and is counted once; after the session closes, the handle refuses at
/// once; after the worker stops, it refuses too. The order is structural, not timed: the
/// idle timeout (60 s) is far beyond every wait here, the reply is posted only once the
/// session is open, and the session closes only when its peer, having got the reply, says
/// "bye".
#[test]
fn deferred_reply_arrives_and_a_closed_session_refuses_cleanly() {
    if !kernel_supports_udpring() {
        return;
    }
    for mode in [
        SessionMode::Shared,
        SessionMode::Connected,
        SessionMode::PortPerClient,
    ] {
        let handles: Arc<Mutex<Vec<SessionHandle>>> = Arc::default();
        let h2 = handles.clone();
        let server = start(
            ServerConfig {
                idle_timeout: Duration::from_secs(60),
                ..session_config(mode, 2)
            },
            move |_| Later {
                handles: h2.clone(),
            },
        );
        let to = server.local_addr();
        let client = client_for(to);
        client.send_to(b"ask", to).expect("send");
        let handle = first_handle(&handles, &format!("{mode:?}"));
        assert_eq!(
            handle.send(b"later"),
            Ok(()),
            "{mode:?}: the session is open"
        );
        let mut buf = [0u8; 16];
        let (n, from) = recv_within(&client, &mut buf, WAIT).unwrap_or_else(|e| {
            panic!(
                "{mode:?}: deferred reply: {e}; {}",
                server.total_counters().summary()
            )
        });
        assert_eq!(&buf[..n], b"later", "{mode:?}");
        match mode {
            SessionMode::PortPerClient => assert_ne!(from, to, "{mode:?}: from its own port"),
            _ => assert_eq!(from, to, "{mode:?}"),
        }
        assert!(
            wait_until(WAIT, || server.total_counters().deferred_sent == 1),
            "{mode:?}: {}",
            server.total_counters().summary()
        );
        // The peer says goodbye: the handler closes the session, and the handle says so.
        client.send_to(b"bye", from).expect("send");
        assert!(
            wait_until(WAIT, || handle.is_closed()),
            "{mode:?}: session closes: {}",
            server.total_counters().summary()
        );
        assert_eq!(handle.send(b"too late"), Err(DeferredError::SessionClosed));
        let c = sum(&server.shutdown().expect("shutdown"));
        assert_eq!(c.deferred_sent, 1, "{mode:?}: {}", c.summary());
        assert_eq!(c.deferred_dropped, 0, "{mode:?}: {}", c.summary());
        assert_eq!(c.closed_by_handler, 1, "{mode:?}: {}", c.summary());
        assert_eq!(c.tx_datagrams, 1, "{mode:?}: only the deferred reply");
        // Once the worker has stopped, sending fails too (not a hang, not a panic).
        assert!(handle.send(b"x").is_err());
    }
}

/// A session that goes quiet closes on its idle timeout, never before it, and its handle
/// then refuses a deferred reply without sending or counting anything.
#[test]
fn an_idle_session_closes_and_its_handle_refuses() {
    if !kernel_supports_udpring() {
        return;
    }
    const IDLE: Duration = Duration::from_millis(200);
    for mode in [
        SessionMode::Shared,
        SessionMode::Connected,
        SessionMode::PortPerClient,
    ] {
        let handles: Arc<Mutex<Vec<SessionHandle>>> = Arc::default();
        let h2 = handles.clone();
        let server = start(
            ServerConfig {
                idle_timeout: IDLE,
                ..session_config(mode, 2)
            },
            move |_| Later {
                handles: h2.clone(),
            },
        );
        let to = server.local_addr();
        let client = client_for(to);
        let sent_at = Instant::now();
        client.send_to(b"ask", to).expect("send");
        let handle = first_handle(&handles, &format!("{mode:?}"));
        assert!(
            wait_until(WAIT, || handle.is_closed()),
            "{mode:?}: the idle session closes: {}",
            server.total_counters().summary()
        );
        // The session opened after the datagram left, so it cannot idle out sooner.
        let closed_after = sent_at.elapsed();
        assert!(
            closed_after >= IDLE,
            "{mode:?}: closed after {closed_after:?}"
        );
        assert_eq!(handle.send(b"too late"), Err(DeferredError::SessionClosed));
        let c = sum(&server.shutdown().expect("shutdown"));
        assert_eq!(c.closed_idle, 1, "{mode:?}: {}", c.summary());
        assert_eq!(c.deferred_sent + c.deferred_dropped, 0, "{mode:?}");
        assert_eq!(c.tx_datagrams, 0, "{mode:?}");
    }
}

/// Sends one datagram from each of `n` new clients bound to `ip` and returns how many got
/// an answer. At most 40 small datagrams are in flight, far under the receive buffer, so
/// none is dropped: it waits until the server has taken all `n`, then for one reply per
/// session opened, then checks that no refused client gets one.
fn answered(server: &Server, ip: &str, n: usize) -> usize {
    let before = server.total_counters();
    let clients: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind(format!("{ip}:0")).expect("bind"))
        .collect();
    let to = server.local_addr();
    for c in &clients {
        c.send_to(b"x", to).expect("send");
    }
    assert!(
        wait_until(WAIT, || arrived(&server.total_counters())
            - arrived(&before)
            == n as u64),
        "the server took {n} datagrams: {}",
        server.total_counters().summary()
    );
    let now = server.total_counters();
    assert_eq!(
        now.kernel_drops,
        before.kernel_drops,
        "{n} datagrams should fit the receive buffer ({} bytes)",
        server.recv_buffer()
    );
    let opened = (now.sessions_opened - before.sessions_opened) as usize;
    let mut got = collect_replies(&clients, opened, WAIT);
    // Refused clients get nothing: a fixed wait, because it checks that nothing happens.
    let late = collect_replies(&clients, 1, Duration::from_millis(100));
    for (g, l) in got.iter_mut().zip(late) {
        g.extend(l);
    }
    for (i, g) in got.iter().enumerate() {
        assert!(
            g.len() <= 1,
            "client {i} got {} replies to one datagram",
            g.len()
        );
    }
    got.iter().filter(|g| !g.is_empty()).count()
}

#[test]
fn admission_limits_are_enforced_and_counted() {
    if !kernel_supports_udpring() {
        return;
    }
    let echo = || udpring::apps::Echo;
    // Per worker.
    let server = start(
        ServerConfig {
            max_sessions_per_worker: 5,
            ..session_config(SessionMode::Shared, 1)
        },
        move |_| echo(),
    );
    assert_eq!(answered(&server, "127.0.0.1", 12), 5);
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].refused_worker_full, 7);
    // Total across workers.
    let server = start(
        ServerConfig {
            max_sessions: 6,
            ..session_config(SessionMode::Shared, 2)
        },
        move |_| echo(),
    );
    assert_eq!(answered(&server, "127.0.0.1", 15), 6);
    let total: u64 = server
        .shutdown()
        .expect("shutdown")
        .iter()
        .map(|c| c.refused_total_full)
        .sum();
    assert_eq!(total, 9);
    // Per source address: 127.0.0.2 is capped, 127.0.0.3 is not affected.
    let server = start(
        ServerConfig {
            max_sessions_per_source: 3,
            ..session_config(SessionMode::Shared, 1)
        },
        move |_| echo(),
    );
    assert_eq!(answered(&server, "127.0.0.2", 8), 3);
    assert_eq!(answered(&server, "127.0.0.3", 2), 2);
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].refused_source, 5);
    // New sessions per second.
    let server = start(
        ServerConfig {
            max_new_sessions_per_sec: 10,
            ..session_config(SessionMode::Shared, 1)
        },
        move |_| echo(),
    );
    // Loose on purpose: the limiter is checked exactly on a virtual clock in `session.rs`
    // (`new_session_rate_holds_in_every_window_of_a_virtual_clock`). Here: the bucket is full
    // at start, so the first 10 are admitted, and while the 40 arrive it gains at most 10 a
    // second (its clock is in whole milliseconds, hence the 1 ms).
    let began = Instant::now();
    let got = answered(&server, "127.0.0.1", 40);
    let took = began.elapsed() + Duration::from_millis(1);
    let most = 10 + (took.as_secs_f64() * 10.0).floor() as usize;
    assert!(
        (10..=most).contains(&got),
        "{got} admitted in {took:?}: at least the burst of 10, at most {most}"
    );
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].refused_rate as usize, 40 - got);
    // Connected-socket cap: beyond it peers are still served, on the shared socket.
    let server = start(
        ServerConfig {
            max_connected: 10,
            ..session_config(SessionMode::Connected, 1)
        },
        move |_| echo(),
    );
    assert_eq!(answered(&server, "127.0.0.1", 30), 30);
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].connected_cap, 20);
    assert_eq!(c[0].sessions_opened, 30);
}

#[test]
fn handler_can_close_its_session() {
    if !kernel_supports_udpring() {
        return;
    }
    struct Bye;
    impl SessionHandler for Bye {
        type State = u32;
        fn session_open(&mut self, _: &SessionInfo) -> u32 {
            0
        }
        fn session_datagram(&mut self, n: &mut u32, d: &Datagram<'_>, r: &mut Reply<'_>) {
            *n += 1;
            let _ = r.send(&n.to_be_bytes());
            if d.payload == b"bye" {
                r.close_session();
            }
        }
    }
    let server = start(session_config(SessionMode::Connected, 1), |_| Bye);
    let to = server.local_addr();
    let client = client_for(to);
    assert_eq!(
        round_trip(&client, to, b"hello").expect("reply").0,
        1u32.to_be_bytes()
    );
    assert_eq!(
        round_trip(&client, to, b"bye").expect("reply").0,
        2u32.to_be_bytes()
    );
    // A new session starts from zero. Like any UDP client, retransmit: a datagram that
    // reaches the old socket in the instant it closes is lost (kernel-notes/sessions.md).
    // Every 500 ms, for WAIT in all (a late answer to an earlier try is as good).
    let third = (0..WAIT.as_millis() / 500)
        .find_map(|_| round_trip_within(&client, to, b"hello", Duration::from_millis(500)));
    if third.is_none() {
        let c = server.total_counters();
        panic!("no reply after close: {}", c.summary());
    }
    assert_eq!(third.expect("reply").0, 1u32.to_be_bytes());
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].closed_by_handler, 1);
    assert_eq!(c[0].sessions_opened, 2);
}

/// Per-client sockets in both families: an IPv6 listener, and a dual-stack `[::]` listener
/// whose IPv4 peers get IPv4 sockets bound to the address they asked on.
#[test]
fn session_sockets_work_over_ipv6_and_dual_stack() {
    if !kernel_supports_udpring() {
        return;
    }
    for mode in [SessionMode::Connected, SessionMode::PortPerClient] {
        for (bind, dst) in [
            ("[::1]:0", "::1"),
            ("[::]:0", "::1"),
            ("[::]:0", "127.0.0.1"),
            ("[::]:0", "127.0.0.2"),
        ] {
            let mismatched = Arc::new(AtomicU64::new(0));
            let m = mismatched.clone();
            let server = start(
                ServerConfig {
                    sessions: mode,
                    ..config(bind, 1)
                },
                move |_| Counting {
                    mismatched: m.clone(),
                },
            );
            let to: SocketAddr =
                SocketAddr::new(dst.parse().expect("address"), server.local_addr().port());
            let client = client_for(to);
            let mut target = to;
            for round in 1..=3u64 {
                let (reply, from) = round_trip(&client, target, b"v6?")
                    .unwrap_or_else(|| panic!("{mode:?} {bind} -> {dst}: no reply"));
                assert_eq!(
                    reply,
                    format!("v6?#{round}").as_bytes(),
                    "{mode:?} {bind} {dst}"
                );
                assert_eq!(
                    from.ip(),
                    to.ip(),
                    "{mode:?} {bind}: reply from the asked address"
                );
                if mode == SessionMode::PortPerClient {
                    target = from;
                } else {
                    assert_eq!(from, to);
                }
            }
            let c = server.shutdown().expect("shutdown");
            assert_eq!(
                c[0].session_socket_errors,
                0,
                "{mode:?} {bind} {dst}: {}",
                c[0].summary()
            );
            assert_eq!(c[0].sessions_opened, 1);
            assert_eq!(mismatched.load(Ordering::Relaxed), 0);
        }
    }
}

/// What the accounting test's handler saw and did, read by the test after shutdown.
#[derive(Default)]
struct Tally {
    /// Datagrams handed to the handler.
    handled: AtomicU64,
    /// Replies the handler asked for (whatever became of them).
    replies: AtomicU64,
    /// Deferred replies `on_shutdown` posted through session handles, accepted.
    posted: AtomicU64,
    /// One handle per session, taken on its first datagram.
    handles: Mutex<Vec<SessionHandle>>,
    /// Clients and the address their session listens on: `on_shutdown` sends from each
    /// right before the sessions close, so datagrams sit on sockets about to close.
    late: Mutex<Vec<(UdpSocket, SocketAddr)>>,
}

/// Datagrams each client sends from `on_shutdown`: small ones, then one too long.
const LATE_SMALL: usize = 3;
const LONGEST: usize = 512;

/// Echoes every datagram, keeps a handle per session; at shutdown sends the late
/// datagrams and posts a deferred goodbye to every session.
struct Accounting {
    tally: Arc<Tally>,
}

impl SessionHandler for Accounting {
    type State = bool;

    fn session_open(&mut self, _: &SessionInfo) -> bool {
        false
    }

    fn session_datagram(&mut self, seen: &mut bool, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        self.tally.handled.fetch_add(1, Ordering::Relaxed);
        if !*seen {
            *seen = true;
            if let Some(handle) = reply.session_handle() {
                self.tally.handles.lock().push(handle);
            }
        }
        self.tally.replies.fetch_add(1, Ordering::Relaxed);
        let _ = reply.send(d.payload);
    }

    fn on_shutdown(&mut self, _: Instant, _: &mut Reply<'_>) {
        for (client, to) in self.tally.late.lock().iter() {
            for _ in 0..LATE_SMALL {
                client.send_to(b"late", *to).expect("send");
            }
            client.send_to(&[0xab; LONGEST + 100], *to).expect("send");
        }
        for handle in self.tally.handles.lock().iter() {
            // The sessions are still open: every post is accepted.
            if handle.send(b"bye").is_ok() {
                self.tally.posted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Issue 14, defect 8: every datagram in exactly one counter, across shutdown. Clients send
/// datagrams (one too long each), then, in the modes with per-client sockets, more datagrams
/// (again one too long) onto sockets that shutdown is about to close, while `on_shutdown`
/// posts a deferred reply to every open session. Before: datagrams drained from the closing
/// sockets were counted as received and dropped uncounted, a long one among them silently
/// cut short, and the deferred replies were counted as dropped although their sessions were
/// open. Now the final counters add up to what was sent, stage by stage (see `stats.rs`).
fn every_datagram_in_one_counter(mode: SessionMode) {
    if !kernel_supports_udpring() {
        return;
    }
    const CLIENTS: usize = 20;
    const EACH: usize = 5;
    let tally = Arc::new(Tally::default());
    let t2 = tally.clone();
    let server = start(
        ServerConfig {
            max_datagram: LONGEST,
            ..session_config(mode, 1)
        },
        move |_| Accounting { tally: t2.clone() },
    );
    let main = server.local_addr();
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| client_for(main)).collect();
    // The first datagram opens the session; port-per-client peers move to its port.
    for c in &clients {
        c.send_to(b"hello", main).expect("send");
    }
    let first = collect_replies(&clients, CLIENTS, WAIT);
    let targets: Vec<SocketAddr> = first
        .iter()
        .enumerate()
        .map(|(i, got)| {
            assert_eq!(got.len(), 1, "{mode:?}: client {i}: {got:?}");
            match mode {
                SessionMode::PortPerClient => got[0].1,
                _ => main,
            }
        })
        .collect();
    for (c, &to) in clients.iter().zip(&targets) {
        for k in 1..EACH {
            c.send_to(format!("d{k}").as_bytes(), to).expect("send");
        }
        c.send_to(&[0xcd; LONGEST + 1], to).expect("send");
    }
    let sent = (CLIENTS * (EACH + 1)) as u64;
    assert!(
        wait_until(WAIT, || arrived(&server.total_counters()) == sent),
        "{mode:?}: sent {sent}: {}",
        server.total_counters().summary()
    );
    let echoes: usize = collect_replies(&clients, CLIENTS * (EACH - 1), WAIT)
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(echoes, CLIENTS * (EACH - 1), "{mode:?}");
    let own_sockets = matches!(mode, SessionMode::Connected | SessionMode::PortPerClient);
    if own_sockets {
        *tally.late.lock() = clients
            .iter()
            .zip(&targets)
            .map(|(c, &to)| (c.try_clone().expect("clone"), to))
            .collect();
    }
    let c = sum(&server.shutdown().expect("shutdown"));
    let (late_small, late_long) = if own_sockets {
        ((CLIENTS * LATE_SMALL) as u64, CLIENTS as u64)
    } else {
        (0, 0)
    };
    let summary = c.summary();
    // What reached the server's sockets.
    assert_eq!(c.kernel_drops, 0, "{mode:?}: {summary}");
    assert_eq!(c.malformed, 0, "{mode:?}: {summary}");
    assert_eq!(
        arrived(&c),
        sent + late_small + late_long,
        "{mode:?}: {summary}"
    );
    assert_eq!(
        c.truncated,
        CLIENTS as u64 + late_long,
        "{mode:?}: {summary}"
    );
    // What was received: handed to the handler, or dropped because its session had closed
    // (no refusals, cookies or forwarding in this set-up).
    let handled = tally.handled.load(Ordering::Relaxed);
    assert_eq!(handled, (CLIENTS * EACH) as u64, "{mode:?}: {summary}");
    assert_eq!(
        c.rx_datagrams,
        handled + c.shutdown_dropped,
        "{mode:?}: {summary}"
    );
    assert_eq!(c.shutdown_dropped, late_small, "{mode:?}: {summary}");
    // Replies: every one asked for, handler's and deferred, is sent or counted as not sent.
    let posted = tally.posted.load(Ordering::Relaxed);
    let sessions = if mode == SessionMode::None {
        0
    } else {
        CLIENTS
    };
    assert_eq!(posted, sessions as u64, "{mode:?}: {summary}");
    assert_eq!(
        c.deferred_dropped, 0,
        "{mode:?}: sessions were open: {summary}"
    );
    assert_eq!(c.deferred_sent, posted, "{mode:?}: {summary}");
    assert_eq!(
        tally.replies.load(Ordering::Relaxed) + c.deferred_sent,
        c.tx_datagrams + c.send_errors + c.send_dropped + c.amplification_limited,
        "{mode:?}: {summary}"
    );
    // The goodbyes arrived, each from its session's address.
    let byes = collect_replies(&clients, sessions, WAIT);
    for (i, got) in byes.iter().enumerate().take(sessions) {
        let expected = vec![(b"bye".to_vec(), targets[i])];
        assert_eq!(got, &expected, "{mode:?}: client {i}");
    }
}

#[test]
fn every_datagram_in_one_counter_without_sessions() {
    every_datagram_in_one_counter(SessionMode::None);
}

#[test]
fn every_datagram_in_one_counter_in_shared_mode() {
    every_datagram_in_one_counter(SessionMode::Shared);
}

#[test]
fn every_datagram_in_one_counter_in_connected_mode() {
    every_datagram_in_one_counter(SessionMode::Connected);
}

#[test]
fn every_datagram_in_one_counter_in_port_per_client_mode() {
    every_datagram_in_one_counter(SessionMode::PortPerClient);
}
