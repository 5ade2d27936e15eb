//! A stateless handler: a DNS-like responder that answers `A` queries for the names in a
//! small table (RFC 1035 message format), `NXDOMAIN` for other names, and counts what is not
//! a query as bad input without answering. The answer is written straight into the send
//! buffer; nothing is allocated per datagram.
//!
//! It starts a server on a free loopback port, sends itself queries with a plain
//! `std::net::UdpSocket`, checks every answer and exits 0 (`tests/it/examples.rs` runs it too).
//!
//! cargo run --example dns

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use udpring::{Datagram, Handler, Reply, Server, ServerConfig, Stats};

const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;

/// One instance per worker; the zone is shared read-only (names in wire form).
struct Dns {
    zone: Vec<(Vec<u8>, Ipv4Addr)>,
}

/// The one question of a query, as offsets into the datagram.
struct Question {
    /// End of the question section (the answer is written after it).
    end: usize,
    /// The name in wire form (length-prefixed labels, ending with the root's 0).
    name: std::ops::Range<usize>,
    qtype: u16,
    qclass: u16,
}

impl Handler for Dns {
    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        let query = d.payload;
        let Some(q) = parse_query(query) else {
            // Not a query we can answer: counted (`bad_input`), never answered.
            reply.count_bad_input();
            return;
        };
        let name = &query[q.name.clone()];
        let found = self
            .zone
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, addr)| addr);
        // A failed reply is counted by the engine (`send_dropped`); DNS clients retry.
        let _ = reply.send_with(|buf| write_response(buf, query, &q, found));
    }
}

/// A standard query (QR 0, opcode 0) with exactly one question whose name uses no
/// compression; `None` for anything else.
fn parse_query(msg: &[u8]) -> Option<Question> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qdcount != 1 {
        return None;
    }
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(at)?);
        if len > 63 {
            return None; // a compression pointer or a reserved label type
        }
        at += 1 + len;
        if at - HEADER_LEN > 255 {
            return None; // names are at most 255 bytes
        }
        if len == 0 {
            break;
        }
    }
    let fixed = msg.get(at..at + 4)?;
    Some(Question {
        end: at + 4,
        name: HEADER_LEN..at,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
    })
}

/// Writes the response into `buf` and returns its length (a length beyond `buf` makes the
/// engine drop and count the reply instead of sending a cut one).
fn write_response(buf: &mut [u8], query: &[u8], q: &Question, found: Option<Ipv4Addr>) -> usize {
    let answer = match found {
        Some(addr) if q.qtype == TYPE_A && q.qclass == CLASS_IN => Some(addr),
        _ => None,
    };
    let len = q.end + if answer.is_some() { 16 } else { 0 };
    if len > buf.len() {
        return len;
    }
    // Header and question as asked; then QR, AA, the query's RD and the response code.
    buf[..q.end].copy_from_slice(&query[..q.end]);
    let rd = u16::from_be_bytes([query[2], query[3]]) & 0x0100;
    let rcode = if found.is_some() { 0 } else { RCODE_NXDOMAIN };
    buf[2..4].copy_from_slice(&(0x8000 | 0x0400 | rd | rcode).to_be_bytes());
    buf[6..8].copy_from_slice(&u16::from(answer.is_some()).to_be_bytes()); // ANCOUNT
    buf[8..12].fill(0); // NSCOUNT, ARCOUNT
    if let Some(addr) = answer {
        let rr = &mut buf[q.end..len];
        // The name: a compression pointer to the question's, at offset 12.
        rr[0..2].copy_from_slice(&0xc00c_u16.to_be_bytes());
        rr[2..4].copy_from_slice(&TYPE_A.to_be_bytes());
        rr[4..6].copy_from_slice(&CLASS_IN.to_be_bytes());
        rr[6..10].copy_from_slice(&300u32.to_be_bytes()); // TTL
        rr[10..12].copy_from_slice(&4u16.to_be_bytes());
        rr[12..16].copy_from_slice(&addr.octets());
    }
    len
}

/// `www.example.test` in wire form: length-prefixed labels and the root's 0.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    msg.extend_from_slice(&wire_name(name));
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    msg
}

fn fail(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

pub fn main() -> std::io::Result<()> {
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers: 2,
        ..ServerConfig::default()
    };
    let server = Server::start(config, |_worker| Dns {
        zone: vec![
            (wire_name("example.test"), Ipv4Addr::new(192, 0, 2, 1)),
            (wire_name("www.example.test"), Ipv4Addr::new(192, 0, 2, 2)),
        ],
    })?;
    let addr = server.local_addr();
    println!("serving DNS-like answers on {addr}");

    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Not a query: counted as bad input, no answer. Sent first, so the answers below
    // (same socket, same worker, in order) prove it has been handled.
    client.send_to(b"\x12\x34 not dns", addr)?;

    // (name, type, expected response code, expected address)
    let cases: [(&str, u16, u16, Option<Ipv4Addr>); 4] = [
        ("example.test", TYPE_A, 0, Some(Ipv4Addr::new(192, 0, 2, 1))),
        (
            "WWW.Example.TEST",
            TYPE_A,
            0,
            Some(Ipv4Addr::new(192, 0, 2, 2)),
        ),
        ("example.test", TYPE_AAAA, 0, None),
        ("missing.test", TYPE_A, RCODE_NXDOMAIN, None),
    ];
    let mut buf = [0u8; 512];
    for (id, (name, qtype, rcode, want)) in (1u16..).zip(cases) {
        let q = query(id, name, qtype);
        client.send_to(&q, addr)?;
        let (n, from) = client.recv_from(&mut buf)?;
        let r = &buf[..n];
        if from != addr || n < q.len() || r[..2] != id.to_be_bytes() {
            return Err(fail(format!("{name}: not the answer to query {id}: {r:?}")));
        }
        let flags = u16::from_be_bytes([r[2], r[3]]);
        let ancount = u16::from_be_bytes([r[6], r[7]]);
        let got = (ancount == 1 && n == q.len() + 16)
            .then(|| Ipv4Addr::new(r[n - 4], r[n - 3], r[n - 2], r[n - 1]));
        if flags & 0x8000 == 0 || flags & 0xf != rcode || got != want {
            return Err(fail(format!(
                "{name}: rcode {} address {got:?}, expected rcode {rcode} address {want:?}",
                flags & 0xf
            )));
        }
        println!("{name} type {qtype}: rcode {rcode}, {got:?}");
    }

    // The workers' final counters, summed.
    let mut total = Stats::default();
    for worker in server.shutdown()? {
        total.add(&worker);
    }
    println!("{}", total.summary());
    if total.bad_input != 1 || total.tx_datagrams != 4 {
        return Err(fail(format!(
            "expected 1 bad input and 4 answers: {}",
            total.summary()
        )));
    }
    Ok(())
}
