//! A session handler: per-peer state, a deferred reply sent from another thread (the seed
//! article's delayed IOCP reply), and close callbacks with their reason. Runs a server with
//! `--sessions connected` semantics on a free loopback port, talks to it, stops.
//!
//! cargo run --example sessions

use std::net::UdpSocket;
use std::time::Duration;

use udpring::{
    CloseReason, Datagram, Reply, Server, ServerConfig, SessionHandler, SessionInfo, SessionMode,
};

/// Counts each peer's requests; "later" is answered 200 ms later from a timer thread.
struct Greeter;

struct Peer {
    requests: u64,
}

impl SessionHandler for Greeter {
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
        if d.payload == b"later" {
            // Any thread can answer through the handle; the worker is woken through its ring.
            if let Some(handle) = reply.session_handle() {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Err(e) = handle.send(b"here it is, 200 ms later") {
                        eprintln!("deferred reply failed: {e}");
                    }
                });
            }
            return;
        }
        let answer = format!("request #{} from you: {}", peer.requests, d.payload.len());
        let _ = reply.send(answer.as_bytes());
    }

    fn session_close(&mut self, peer: Peer, info: &SessionInfo, reason: CloseReason) {
        println!(
            "close  {} after {} requests ({reason:?})",
            info.peer, peer.requests
        );
    }
}

fn main() -> std::io::Result<()> {
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers: 1,
        sessions: SessionMode::Connected,
        idle_timeout: Duration::from_millis(300),
        // Answers here are longer than the requests: allow it for this demo.
        amplification_factor: 0,
        ..ServerConfig::default()
    };
    let server = Server::start(config, |_worker| Greeter)?;
    let addr = server.local_addr();
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 256];
    for msg in [&b"hello"[..], b"again", b"later"] {
        client.send_to(msg, addr)?;
        let (n, from) = client.recv_from(&mut buf)?;
        println!("reply  from {from}: {}", String::from_utf8_lossy(&buf[..n]));
    }
    // Stay quiet past the idle timeout: the session closes (reason Idle).
    std::thread::sleep(Duration::from_millis(600));
    server.shutdown()?;
    Ok(())
}
