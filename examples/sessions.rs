//! A session handler: per-peer state of the handler's own type, a socket per client
//! (`SessionMode::Connected`, the "UDP accept" model), and the close callback with its
//! reason: a peer that says `bye` is closed by the handler, the others after the idle
//! timeout.
//!
//! It starts a server on a free loopback port, talks to it from three `std::net::UdpSocket`
//! clients, checks every answer and each session's end, and exits 0 (`tests/it/examples.rs`
//! runs it too).
//!
//! cargo run --example sessions

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use udpring::session::CloseReason;
use udpring::{Datagram, Reply, Server, ServerConfig, SessionHandler, SessionInfo, SessionMode};

/// What each session ended with: peer, reason, requests served.
type Closed = Arc<Mutex<Vec<(SocketAddr, CloseReason, u64)>>>;

/// One per worker. The state of each peer is a `Peer`, which the engine keeps per session
/// and hands to every callback: no map of peers in the handler.
struct Counter {
    closed: Closed,
}

struct Peer {
    requests: u64,
}

impl SessionHandler for Counter {
    type State = Peer;

    fn session_open(&mut self, info: &SessionInfo) -> Peer {
        println!(
            "open   {} on worker {} (own socket: {})",
            info.peer, info.worker, info.own_socket
        );
        Peer { requests: 0 }
    }

    fn session_datagram(&mut self, peer: &mut Peer, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        peer.requests += 1;
        if d.payload == b"bye" {
            let _ = reply.send(b"bye");
            // `session_close` follows once this call returns, with `HandlerClosed`.
            reply.close_session();
            return;
        }
        let answer = format!("#{} {}", peer.requests, String::from_utf8_lossy(d.payload));
        let _ = reply.send(answer.as_bytes());
    }

    fn session_close(&mut self, peer: Peer, info: &SessionInfo, reason: CloseReason) {
        println!(
            "close  {} after {} requests ({reason:?})",
            info.peer, peer.requests
        );
        let mut closed = self.closed.lock().expect("no panic while held");
        closed.push((info.peer, reason, peer.requests));
    }
}

fn fail(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

pub fn main() -> std::io::Result<()> {
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers: 2,
        sessions: SessionMode::Connected,
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let closed = Closed::default();
    let for_workers = closed.clone();
    let server = Server::start(config, move |_worker| Counter {
        closed: for_workers.clone(),
    })?;
    let addr = server.local_addr();
    println!("serving sessions on {addr}");

    let clients: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0")?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(c)
        })
        .collect::<std::io::Result<_>>()?;
    let mut buf = [0u8; 256];
    for round in 1..=3 {
        for client in &clients {
            client.send_to(b"ping", addr)?;
            let (n, from) = client.recv_from(&mut buf)?;
            // Each peer has its own count, and its session socket answers from the server's
            // address and port.
            let want = format!("#{round} ping");
            if from != addr || buf[..n] != *want.as_bytes() {
                return Err(fail(format!(
                    "expected {want:?} from {addr}, got {:?} from {from}",
                    String::from_utf8_lossy(&buf[..n])
                )));
            }
        }
    }
    let leaving = clients[0].local_addr()?;
    clients[0].send_to(b"bye", addr)?;
    let (n, _) = clients[0].recv_from(&mut buf)?;
    if &buf[..n] != b"bye" {
        return Err(fail(format!("expected bye, got {:?}", &buf[..n])));
    }

    // The two others fall quiet: their sessions close once idle for 200 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed.lock().expect("no panic while held").len() < 3 {
        if Instant::now() > deadline {
            return Err(fail(format!("sessions still open: closed {:?}", closed)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    server.shutdown()?;

    let mut ended = closed.lock().expect("no panic while held").clone();
    ended.sort_by_key(|&(peer, ..)| peer != leaving);
    let [(first, r0, n0), (_, r1, n1), (_, r2, n2)] = ended[..] else {
        return Err(fail(format!("expected three sessions, got {ended:?}")));
    };
    if first != leaving
        || (r0, n0) != (CloseReason::HandlerClosed, 4)
        || (r1, n1) != (CloseReason::Idle, 3)
        || (r2, n2) != (CloseReason::Idle, 3)
    {
        return Err(fail(format!("unexpected session ends: {ended:?}")));
    }
    Ok(())
}
