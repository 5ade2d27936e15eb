//! The QUIC handler driven sans-IO: quinn-proto clients in this process, datagrams carried by
//! the [`Harness`] (a send pool without GSO, so every reply is one datagram), and the clock
//! passed to the timer moved on by hand. Every loop is bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::{ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint};

use super::*;
use crate::harness::Harness;
use crate::quic::{Identity, Quic, QuicConfig, QuicStats, ALPN_HQ};

const SERVER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    4433,
));

/// Steps any exchange here may take before a test gives up.
const STEPS: usize = 20_000;

/// One client address with its quinn-proto endpoint and connections.
struct Client {
    addr: SocketAddr,
    endpoint: Endpoint,
    conns: HashMap<ConnectionHandle, Connection>,
    config: ClientConfig,
    /// Datagrams from the server not yet handed to `endpoint`.
    inbox: Vec<Vec<u8>>,
    /// Stream bytes read, all connections together.
    read: usize,
}

impl Client {
    fn new(port: u16, cert: &rustls::pki_types::CertificateDer<'static>) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_HQ.to_vec()];
        let config = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        Client {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None),
            conns: HashMap::new(),
            config,
            inbox: Vec::new(),
            read: 0,
        }
    }

    fn connect(&mut self, now: Instant) -> ConnectionHandle {
        let (ch, conn) = self
            .endpoint
            .connect(now, self.config.clone(), SERVER, "localhost")
            .unwrap();
        self.conns.insert(ch, conn);
        ch
    }

    /// Takes what the server sent, runs the connections, and returns their datagrams.
    fn run(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        for datagram in std::mem::take(&mut self.inbox) {
            let data = BytesMut::from(&datagram[..]);
            buf.clear();
            if let Some(DatagramEvent::ConnectionEvent(ch, event)) = self
                .endpoint
                .handle(now, SERVER, None, None, data, &mut buf)
            {
                if let Some(conn) = self.conns.get_mut(&ch) {
                    conn.handle_event(event);
                }
            }
        }
        let mut out = Vec::new();
        for (&ch, conn) in self.conns.iter_mut() {
            if conn.poll_timeout().is_some_and(|t| t <= now) {
                conn.handle_timeout(now);
            }
            while let Some(event) = conn.poll_endpoint_events() {
                if let Some(event) = self.endpoint.handle_event(ch, event) {
                    conn.handle_event(event);
                }
            }
            while let Some(event) = conn.poll() {
                if let quinn_proto::Event::Stream(quinn_proto::StreamEvent::Readable { id }) = event
                {
                    let mut recv = conn.recv_stream(id);
                    if let Ok(mut chunks) = recv.read(true) {
                        while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                            self.read += chunk.bytes.len();
                        }
                        let _ = chunks.finalize();
                    };
                }
            }
            buf.clear();
            while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
                out.push(buf[..t.size].to_vec());
                buf.clear();
            }
        }
        out
    }

    fn connected(&self, ch: ConnectionHandle) -> bool {
        self.conns
            .get(&ch)
            .is_some_and(|c| !c.is_handshaking() && !c.is_closed())
    }

    /// Asks for `path` over hq-interop on a new stream of connection `ch`.
    fn get(&mut self, ch: ConnectionHandle, path: &str) {
        let conn = self.conns.get_mut(&ch).unwrap();
        let id = conn.streams().open(Dir::Bi).expect("stream credit");
        let request = format!("GET {path}\r\n");
        assert_eq!(
            conn.send_stream(id).write(request.as_bytes()).unwrap(),
            request.len()
        );
        conn.send_stream(id).finish().unwrap();
    }
}

/// The handler of worker 0 and the clients, datagrams carried between them.
struct Net {
    quic: Quic,
    handler: QuicHandler,
    harness: Harness,
    clients: Vec<Client>,
    root: std::path::PathBuf,
}

impl Net {
    fn new(clients: usize, slots: usize, tweak: impl FnOnce(&mut QuicConfig)) -> Net {
        let made = Identity::self_signed(&["localhost".into()]).unwrap();
        let cert = made.identity.chain[0].clone();
        let root = std::env::temp_dir().join(format!(
            "udpring-quic-sansio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("big"), vec![7u8; 8 << 20]).unwrap();
        let mut config = QuicConfig {
            root: Some(root.clone()),
            ..QuicConfig::new(made.identity)
        };
        tweak(&mut config);
        let quic = Quic::new(config).unwrap();
        let handler = quic.handler(0);
        Net {
            quic,
            handler,
            harness: Harness::new(65_507, slots),
            clients: (0..clients)
                .map(|i| Client::new(10_000 + i as u16, &cert))
                .collect(),
            root,
        }
    }

    fn stats(&self) -> QuicStats {
        self.quic.stats()
    }

    /// The clients' datagrams into the handler (stateless answers go straight back).
    fn deliver(&mut self, now: Instant) {
        for i in 0..self.clients.len() {
            let from = self.clients[i].addr;
            for datagram in self.clients[i].run(now) {
                let d = Datagram::new(from, &datagram);
                let clients = &mut self.clients;
                self.harness
                    .deliver(&mut self.handler, &d, |to, bytes| route(clients, to, bytes));
            }
        }
    }

    /// One handler turn at `now` if its timer asks for one: the replies go to the clients'
    /// inboxes; returns how many datagrams each client was sent.
    fn turn(&mut self, now: Instant) -> Vec<usize> {
        let mut sent = vec![0; self.clients.len()];
        if self.handler.next_timer().is_some_and(|t| t <= now) {
            let clients = &mut self.clients;
            self.harness
                .fire_timer(&mut self.handler, now, |to, bytes| {
                    if let Some(i) = clients.iter().position(|c| c.addr == to) {
                        sent[i] += 1;
                    }
                    route(clients, to, bytes)
                });
        }
        sent
    }

    /// Exchanges datagrams until `done` holds, at most [`STEPS`] rounds.
    fn run_until(&mut self, mut done: impl FnMut(&Net) -> bool) -> bool {
        for _ in 0..STEPS {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            self.deliver(now);
            self.turn(now);
        }
        done(self)
    }

    /// Connects `count` connections from client `client`, handshakes completed.
    fn connect(&mut self, client: usize, count: usize) -> Vec<ConnectionHandle> {
        let now = Instant::now();
        let handles: Vec<_> = (0..count)
            .map(|_| self.clients[client].connect(now))
            .collect();
        let hs = handles.clone();
        assert!(
            self.run_until(|n| hs.iter().all(|&ch| n.clients[client].connected(ch))),
            "handshakes complete: {:?}",
            self.stats()
        );
        handles
    }

    /// The invariant of the timer heap: every connection that is not waiting to be driven
    /// has an entry no later than its timeout, so no timeout is ever missed.
    fn check_timers(&mut self) {
        let live: Vec<(usize, Instant, u64)> = self
            .handler
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                if c.dirty {
                    return None;
                }
                Some((i, c.timeout?, c.key))
            })
            .collect();
        for &(i, timeout, key) in &live {
            let entry = self
                .handler
                .timers
                .iter()
                .any(|&Reverse((t, index, k))| index == i && k == key && t <= timeout);
            assert!(entry, "connection {i}: an entry at or before its timeout");
        }
        let earliest = live.iter().map(|&(_, t, _)| t).min();
        if let (Some(earliest), true) = (earliest, self.handler.dirty.is_empty()) {
            let next = self
                .handler
                .next_timer()
                .expect("a timer while timeouts are set");
            assert!(next <= earliest, "next_timer never later than a timeout");
        }
        assert!(
            self.handler.timers.len() <= TIMER_SLACK * self.handler.live + 64,
            "stale entries are bounded"
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn route(clients: &mut [Client], to: SocketAddr, bytes: &[u8]) {
    if let Some(c) = clients.iter_mut().find(|c| c.addr == to) {
        c.inbox.push(bytes.to_vec());
    }
}

/// Issue 15: a connection that filled the send pool was put back at the front of the dirty
/// queue and driven first again, so while it had data to send the next connection was not
/// driven at all. Two connections each ask for an 8 MiB file at once; with four send slots,
/// both have been sent something after two turns.
#[test]
fn a_connection_that_fills_the_pool_goes_to_the_back() {
    let mut net = Net::new(2, 4, |_| {});
    let a = net.connect(0, 1)[0];
    let b = net.connect(1, 1)[0];
    // Everything of the handshakes is delivered and answered.
    let settled = net
        .run_until(|n| n.handler.dirty.is_empty() && n.clients.iter().all(|c| c.inbox.is_empty()));
    assert!(settled);
    net.clients[0].get(a, "/big");
    net.clients[1].get(b, "/big");
    let now = Instant::now();
    net.deliver(now);
    let first = net.turn(now);
    let second = net.turn(now);
    assert_eq!(
        first.iter().sum::<usize>(),
        4,
        "the first turn filled the pool: {first:?}"
    );
    assert!(
        first[0] > 0 && second[1] > 0,
        "both connections served within two turns: {first:?} then {second:?}"
    );
    // And both transfers finish.
    let done = net.run_until(|n| n.clients.iter().all(|c| c.read >= 8 << 20));
    assert!(
        done,
        "both files arrive: {:?} {:?}",
        net.stats(),
        net.clients.iter().map(|c| c.read).collect::<Vec<_>>()
    );
    assert_eq!(net.harness.counters().send_dropped, 0);
}

/// The per-drive cap: once a transfer's congestion window has grown past a drive's share,
/// a second connection that asks for something is driven after at most that share of the
/// first's datagrams, not after all the first may send.
#[test]
fn each_drive_sends_at_most_its_share() {
    let mut net = Net::new(2, 1024, |_| {});
    let a = net.connect(0, 1)[0];
    let b = net.connect(1, 1)[0];
    net.clients[0].get(a, "/big");
    assert!(
        net.run_until(|n| n.clients[0].read >= 2 << 20),
        "a quarter of A's file: {} {:?}",
        net.clients[0].read,
        net.harness.counters().send_dropped
    );
    net.clients[1].get(b, "/big");
    let now = Instant::now();
    // A's acknowledgements first, then B's request: A is first in the queue.
    net.deliver(now);
    let mut order = Vec::new();
    let clients = &mut net.clients;
    net.harness.fire_timer(&mut net.handler, now, |to, bytes| {
        order.push(to);
        route(clients, to, bytes)
    });
    let (a_addr, b_addr) = (net.clients[0].addr, net.clients[1].addr);
    let a_sent = order.iter().filter(|&&to| to == a_addr).count();
    assert!(
        a_sent > DRIVE_DATAGRAMS + 65_507 / MAX_SEGMENT,
        "A had more than one drive's worth to send in this turn: {a_sent}"
    );
    let first_b = order.iter().position(|&to| to == b_addr);
    let first_b = first_b.expect("B was driven in the same turn");
    // A drive stops once it has sent its share; its last transmit may be a whole train (as
    // many datagrams as a slot holds), so a drive sends less than share + one train.
    let bound = DRIVE_DATAGRAMS + 65_507 / MAX_SEGMENT;
    assert!(
        first_b < bound,
        "B's first datagram after one drive of A ({first_b} of A's first, bound {bound}; \
         A sent {a_sent} this turn)"
    );
    assert!(a_sent > first_b, "A was driven again after B");
    assert_eq!(net.harness.counters().send_dropped, 0);
}

/// The timer heap against a brute-force scan, through handshakes, transfers and idle
/// timeouts of 40 connections on four client addresses, the clock moved on to each
/// `next_timer`: no connection's timeout is missed, stale entries stay bounded, and every
/// connection is freed when its idle timeout passes.
#[test]
fn the_timer_heap_misses_no_timeout() {
    let mut net = Net::new(4, 256, |c| c.idle_timeout = Duration::from_secs(2));
    let mut handles = Vec::new();
    for client in 0..4 {
        for ch in net.connect(client, 10) {
            handles.push((client, ch));
        }
        net.check_timers();
    }
    assert_eq!(net.handler.connections(), 40);
    // A request on half of them: their timers move (later idle, loss detection earlier).
    for &(client, ch) in handles.iter().step_by(2) {
        net.clients[client].get(ch, "/missing");
    }
    for _ in 0..50 {
        let now = Instant::now();
        net.deliver(now);
        net.turn(now);
        net.check_timers();
    }
    // The clients go silent; the server's timers run on a clock moved to each deadline.
    let mut now = Instant::now();
    let mut steps = 0;
    while net.handler.connections() > 0 {
        steps += 1;
        assert!(
            steps < 100_000,
            "bounded: {} left",
            net.handler.connections()
        );
        let next = net
            .handler
            .next_timer()
            .expect("live connections have timers");
        now = now.max(next);
        let _ = net.turn(now);
        for c in &mut net.clients {
            c.inbox.clear();
        }
        net.check_timers();
    }
    assert!(
        now.duration_since(Instant::now()) < Duration::from_secs(10),
        "idle timeouts, not later"
    );
    assert_eq!(net.stats().drained, 40);
    assert!(net.handler.timers.is_empty() || net.handler.first_timer().is_none());
}

/// Issue 15: every Initial was accepted unless `validate_peers`. Above two handshakes in
/// flight new peers must return a Retry token; at four they are refused; once the
/// handshakes complete, a new peer is accepted directly again.
#[test]
fn handshakes_in_flight_are_capped() {
    let mut net = Net::new(6, 256, |c| {
        c.retry_above_handshakes = 2;
        c.max_handshakes = 4;
    });
    let now = Instant::now();
    let handles: Vec<ConnectionHandle> = (0..6).map(|i| net.clients[i].connect(now)).collect();
    // The Initials, in client order; the server's answers (its Initials, or Retries) go back.
    net.deliver(now);
    net.turn(now);
    assert_eq!(net.handler.handshakes_in_flight(), 2);
    let s = net.stats();
    assert_eq!((s.accepted, s.retries, s.retries_busy), (2, 4, 4), "{s:?}");
    // The retried clients come back with tokens: two more fit under the cap, two are refused.
    // (Only the Initials with tokens are delivered: the first two clients' handshakes stay
    // in flight meanwhile.)
    for i in 2..6 {
        let from = net.clients[i].addr;
        for datagram in net.clients[i].run(now) {
            let d = Datagram::new(from, &datagram);
            let clients = &mut net.clients;
            net.harness
                .deliver(&mut net.handler, &d, |to, bytes| route(clients, to, bytes));
        }
    }
    net.turn(now);
    let s = net.stats();
    assert_eq!(net.handler.handshakes_in_flight(), 4);
    assert_eq!((s.accepted, s.refused_busy), (4, 2), "{s:?}");
    // Everything completes: the refused ones learn it, the others connect.
    assert!(net.run_until(|n| {
        (0..4).all(|i| n.clients[i].connected(handles[i]))
            && (4..6).all(|i| n.clients[i].conns[&handles[i]].is_closed())
            && n.handler.handshakes_in_flight() == 0
    }));
    assert_eq!(net.handler.handshakes_in_flight(), 0);
    let retries = net.stats().retries;
    let late = net.clients[0].connect(Instant::now());
    assert!(net.run_until(|n| n.clients[0].connected(late)));
    assert_eq!(
        net.stats().retries,
        retries,
        "no Retry with no handshake in flight"
    );
    assert_eq!(net.handler.connections(), 5);
}

/// A turn's cost with 10,000 idle connections (and one active one), printed: run with
/// `cargo test --release --features quic --lib turn_cost -- --ignored --nocapture`. It also
/// times the scan the heap replaced (the minimum over every connection's timeout, which the
/// old `on_timer` computed each turn) over the same connections.
#[test]
#[ignore = "measurement: prints a turn's cost with 10,000 idle connections"]
fn turn_cost_with_10000_idle_connections() {
    let mut net = Net::new(11, 4096, |_| {});
    let started = Instant::now();
    for client in 0..10 {
        net.connect(client, 1000);
    }
    let active = net.connect(10, 1)[0];
    let set_up = started.elapsed();
    assert!(net
        .run_until(|n| n.handler.dirty.is_empty() && n.clients.iter().all(|c| c.inbox.is_empty())));
    // Each turn: the active connection asks for a missing file and is answered; the 10,000
    // others have timers (idle, none due) and nothing to do.
    let turns = 2_000;
    let mut spent = Duration::ZERO;
    for _ in 0..turns {
        net.clients[10].get(active, "/missing");
        let now = Instant::now();
        let from = net.clients[10].addr;
        let out = net.clients[10].run(now);
        let timer = Instant::now();
        for datagram in out {
            let d = Datagram::new(from, &datagram);
            let clients = &mut net.clients;
            net.harness
                .deliver(&mut net.handler, &d, |to, bytes| route(clients, to, bytes));
        }
        net.turn(now);
        spent += timer.elapsed();
        for c in &mut net.clients[..10] {
            c.inbox.clear();
        }
    }
    // What the scan before the heap added to every turn: the minimum of every connection's
    // timeout (once per turn; a due timer also cost a second pass over all of them).
    let mut scanned = Duration::ZERO;
    for _ in 0..turns {
        let timer = Instant::now();
        let earliest = net
            .handler
            .conns
            .iter()
            .flatten()
            .filter_map(|c| c.timeout)
            .min();
        std::hint::black_box(earliest);
        scanned += timer.elapsed();
    }
    println!(
        "10,001 connections (set up in {set_up:?}): {:?} per turn (handler receive + timer \
         turn, {turns} turns); the old per-turn scan of every connection alone: {:?}",
        spent / turns,
        scanned / turns
    );
}

/// Issue 16: with a QUIC-LB configuration every CID a worker issues is in the plaintext
/// format (first octet, server ID, worker), distinct, and validated only for its own worker.
#[test]
fn worker_cids_follow_the_configured_format() {
    use quinn_proto::ConnectionIdGenerator;
    let lb = crate::quic::cid::LbConfig::new(3, vec![0xde, 0xad]).unwrap();
    let format = CidFormat::load_balanced(lb);
    let mut gen = WorkerCids::new(5, format.clone());
    let mut other = WorkerCids::new(6, format.clone());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let cid = gen.generate_cid();
        assert_eq!(cid.len(), gen.cid_len());
        assert_eq!(
            cid[0],
            (3 << 5) | (cid.len() as u8 - 1),
            "config 3, length self-described"
        );
        assert_eq!(&cid[1..3], &[0xde, 0xad], "the server ID at offset 1");
        assert_eq!(cid[3], 5, "the worker just past it");
        assert!(gen.validate(&cid).is_ok());
        assert!(other.validate(&cid).is_err(), "another worker's");
        assert!(seen.insert(cid[..].to_vec()), "every CID distinct");
    }
    assert!(gen.validate(&other.generate_cid()).is_err());
    // Today's format is not accepted by a load-balanced worker, nor the other way round.
    let mut plain = WorkerCids::new(5, CidFormat::default());
    assert!(gen.validate(&plain.generate_cid()).is_err());
    assert!(plain.validate(&gen.generate_cid()).is_err());
}

/// Issue 16: hosts of a fleet given the same stateless reset key (`--stateless-reset-key`).
/// After a load balancer moved a connection to a host that does not have it, that host
/// answers with a stateless reset and the client takes it at once (its connection ends with
/// `Reset`); a host with a key of its own sends a reset the client cannot recognise, and the
/// client goes on waiting (until its idle timeout).
#[test]
fn a_shared_reset_key_lets_another_host_reset_a_connection() {
    let key = vec![0x5au8; 32];
    for shared in [true, false] {
        let mut net = Net::new(1, 64, |q| q.stateless_reset_key = Some(key.clone()));
        let ch = net.connect(0, 1)[0];
        let made = Identity::self_signed(&["localhost".into()]).unwrap();
        let other = Quic::new(QuicConfig {
            stateless_reset_key: shared.then(|| key.clone()),
            ..QuicConfig::new(made.identity)
        })
        .unwrap();
        let mut host_b = other.handler(0);
        let mut harness = Harness::new(65_507, 64);
        // The client's next packets reach host B instead.
        net.clients[0].get(ch, "/big");
        let now = Instant::now();
        let from = net.clients[0].addr;
        let mut answers = Vec::new();
        for datagram in net.clients[0].run(now) {
            harness.deliver(&mut host_b, &Datagram::new(from, &datagram), |_, bytes| {
                answers.push(bytes.to_vec())
            });
        }
        assert!(!answers.is_empty(), "host B answers the unknown connection");
        assert!(other.stats().stateless_resets >= 1, "{:?}", other.stats());
        net.clients[0].inbox.extend(answers);
        net.clients[0].run(now);
        let conn = &net.clients[0].conns[&ch];
        assert_eq!(
            conn.is_closed(),
            shared,
            "shared key {shared}: the client took the reset only when it could check it"
        );
    }
}
