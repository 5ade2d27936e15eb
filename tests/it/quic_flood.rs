//! Measurement (issue 15): an established connection's round-trip latency on one worker,
//! quiet and under a flood of distinct Initials from many source ports, with the handshake
//! caps (Retry above `retry_above_handshakes`, refusal at `max_handshakes`) and without them
//! (every Initial accepted, as before the caps). Release build, ignored:
//! `cargo test --release --features internals --test it -- quic_flood:: --ignored --nocapture`
//! (`make stress` runs it too). `QUIC_FLOOD_RATE` sets the Initials per second (10,000).
#![cfg(feature = "quic")]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use udpring::quic::{QuicConfig, ALPN_ECHO};

use crate::common::quic::*;
use crate::common::*;

/// How long each phase sends requests.
const PHASE: Duration = Duration::from_secs(2);
/// Source ports the flood comes from.
const SOURCES: usize = 256;

/// `n` distinct client Initials (fresh connection IDs and keys each), as a quinn client
/// would send them to `to`.
fn initials(cert: &CertificateDer<'static>, to: SocketAddr, n: usize) -> Vec<Vec<u8>> {
    let config = client_config(cert, ALPN_ECHO);
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), to, "localhost")
                .expect("connect");
            let mut buf = Vec::new();
            let transmit = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
            buf.truncate(transmit.size);
            buf
        })
        .collect()
}

/// Sends `initials` round robin from `SOURCES` sockets at `rate` per second (in 1 ms
/// batches) until `stop`; counts what it sent.
fn flood(
    to: SocketAddr,
    initials: Arc<Vec<Vec<u8>>>,
    rate: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (0..SOURCES)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
                s.set_nonblocking(true).expect("nonblocking");
                s
            })
            .collect();
        let started = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // Catch up to the rate, then wait for the next millisecond.
            let due = (started.elapsed().as_micros() as u64 * rate) / 1_000_000;
            while n < due {
                let i = n as usize;
                // A full socket buffer drops the datagram, as a flood's would be.
                let _ = sockets[i % SOURCES].send_to(&initials[i % initials.len()], to);
                n += 1;
            }
            sent.store(n, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// Sequential 64-byte echoes for `PHASE`: each one's round trip.
fn round_trips(rt: &tokio::runtime::Runtime, conn: &quinn::Connection) -> Vec<Duration> {
    block_on(rt, async {
        let mut times = Vec::new();
        let until = Instant::now() + PHASE;
        while Instant::now() < until {
            let at = Instant::now();
            echo_once(conn, times.len(), 64).await;
            times.push(at.elapsed());
        }
        times
    })
}

struct Summary {
    requests: usize,
    mean: Duration,
    median: Duration,
    p99: Duration,
}

fn summary(mut times: Vec<Duration>) -> Summary {
    times.sort();
    Summary {
        requests: times.len(),
        mean: times.iter().sum::<Duration>() / times.len() as u32,
        median: times[times.len() / 2],
        p99: times[times.len() * 99 / 100],
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, mean {:?}, median {:?}, p99 {:?}",
            self.requests, self.mean, self.median, self.p99
        )
    }
}

/// One server: a quiet phase, then a flood phase; returns both and the server's counters.
fn run(capped: bool, rate: u64) -> (Summary, Summary, String) {
    let server = QuicServer::start_configured(
        1,
        |q: &mut QuicConfig| {
            q.idle_timeout = Duration::from_secs(30);
            if !capped {
                q.retry_above_handshakes = usize::MAX;
                q.max_handshakes = usize::MAX;
            }
        },
        |_| {},
    );
    let rt = runtime();
    let endpoint = {
        let _guard = rt.enter();
        client(&server.cert, ALPN_ECHO)
    };
    let addr = server.addr();
    let conn = block_on(&rt, async {
        endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake")
    });
    // Warm up: keys, congestion window, allocator.
    block_on(&rt, async {
        for i in 0..200 {
            echo_once(&conn, i, 64).await;
        }
    });
    let quiet = summary(round_trips(&rt, &conn));
    let initials = Arc::new(initials(&server.cert, addr, (rate * 3) as usize));
    let (stop, sent) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let flooder = flood(addr, initials, rate, stop.clone(), sent.clone());
    // The flood reaches its rate first.
    assert!(wait_until(WAIT, || sent.load(Ordering::Relaxed) >= rate / 10));
    let flooded = summary(round_trips(&rt, &conn));
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("flood thread");
    let stats = server.stats();
    let counts = format!(
        "sent {} Initials: accepted {}, retries_busy {}, refused_busy {}; kernel drops {}",
        sent.load(Ordering::Relaxed),
        stats.accepted,
        stats.retries_busy,
        stats.refused_busy,
        server.server.total_counters().kernel_drops
    );
    if capped {
        assert!(
            stats.retries_busy > 0,
            "the flood met the Retry cap: {counts}"
        );
        assert!(
            stats.accepted <= 1 + QuicConfig::DEFAULT_RETRY_ABOVE_HANDSHAKES as u64 + 1,
            "no more handshakes than the cap: {counts}"
        );
    }
    conn.close(0u32.into(), b"done");
    (quiet, flooded, counts)
}

#[test]
#[ignore = "measurement: an Initial flood against an established connection's latency"]
fn an_initial_flood_leaves_established_latency_within_2x() {
    if !kernel_supports_udpring() {
        return;
    }
    let rate: u64 = std::env::var("QUIC_FLOOD_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10_000);
    let (quiet, flooded, counts) = run(true, rate);
    println!("caps on, quiet:   {quiet}");
    println!("caps on, flood of {rate} Initials/s from {SOURCES} ports: {flooded}  ({counts})");
    let (quiet_off, flooded_off, counts_off) = run(false, rate);
    println!("caps off, quiet:  {quiet_off}");
    println!("caps off, flood of {rate} Initials/s: {flooded_off}  ({counts_off})");
    let ratio = flooded.median.as_secs_f64() / quiet.median.as_secs_f64();
    let ratio_off = flooded_off.median.as_secs_f64() / quiet_off.median.as_secs_f64();
    println!("median latency, flood / quiet: caps on {ratio:.2}x, caps off {ratio_off:.2}x");
    assert!(
        ratio <= 2.0,
        "an Initial flood more than doubled the established connection's median latency"
    );
}
