//! A custom handler: answers each datagram in upper case and prefixes how many datagrams this
//! worker has seen from that peer. Runs a server on a free loopback port, talks to it, stops.
//!
//! cargo run --example uppercase

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use udpring::{Datagram, Handler, Reply, Server, ServerConfig};

/// One instance per worker thread: plain `HashMap`, no lock.
#[derive(Default)]
struct Uppercase {
    seen: HashMap<SocketAddr, u64>,
}

impl Handler for Uppercase {
    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        let n = self.seen.entry(d.peer).or_insert(0);
        *n += 1;
        let count = *n;
        // Build the reply straight into the send buffer; `d.payload` borrows the receive
        // buffer, so nothing is copied twice.
        let result = reply.send_with(|buf| {
            let prefix = format!("#{count} ");
            let total = prefix.len() + d.payload.len();
            if total > buf.len() {
                return total; // too long: counted as dropped
            }
            buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
            for (o, i) in buf[prefix.len()..total].iter_mut().zip(d.payload) {
                *o = i.to_ascii_uppercase();
            }
            total
        });
        if let Err(e) = result {
            eprintln!("reply to {} dropped: {e}", d.peer);
        }
    }
}

fn main() -> std::io::Result<()> {
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers: 2,
        ..ServerConfig::default()
    };
    let server = Server::start(config, |_worker| Uppercase::default())?;
    let addr = server.local_addr();
    println!("serving on {addr}");

    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 1500];
    for word in ["hello", "io_uring", "world"] {
        client.send_to(word.as_bytes(), addr)?;
        let (n, _) = client.recv_from(&mut buf)?;
        println!("{word} -> {}", String::from_utf8_lossy(&buf[..n]));
    }

    for (i, c) in server.shutdown()?.iter().enumerate() {
        println!("worker {i}: {}", c.summary());
    }
    Ok(())
}
