//! Resumption and 0-RTT against the quinn client: a resumed connection's early data is
//! answered and counted as early data; `early_data: false` (`--no-0rtt`) refuses early data
//! but still resumes; with two workers a ticket one worker issued resumes on the other. The
//! resumption across `--takeover` is in `tests/it/ops/quic_takeover.rs`.
#![cfg(feature = "quic")]

use std::time::Duration;

use udpring::quic::{QuicStats, ALPN_ECHO};

use crate::common::quic::*;
use crate::common::*;

fn endpoint(config: &quinn::ClientConfig) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client");
    endpoint.set_default_client_config(config.clone());
    endpoint
}

/// One thread: the client's driver runs only when the test's task waits, so the request of a
/// 0-RTT connection is queued before its first flight leaves and goes out as 0-RTT data.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A full handshake and `echoes` echoes; the connection is closed and drained, so the client
/// holds the server's tickets.
async fn first_connection(endpoint: &quinn::Endpoint, addr: std::net::SocketAddr, echoes: usize) {
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    for n in 0..echoes {
        echo_once(&conn, n, 100).await;
    }
    conn.close(0u32.into(), b"done");
}

/// A resumed connection with its request in 0-RTT data: whether the server accepted it, after
/// the echo came back byte-exact.
async fn zero_rtt_echo(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    echoes: usize,
) -> bool {
    let connecting = endpoint.connect(addr, "localhost").expect("connect");
    let (conn, accepted) = match connecting.into_0rtt() {
        Ok(pair) => pair,
        Err(_) => panic!("the client holds a ticket that allows 0-RTT"),
    };
    for n in 0..echoes {
        echo_once(&conn, 1000 + n, 200).await;
    }
    let accepted = accepted.await;
    conn.close(0u32.into(), b"done");
    accepted
}

fn wait_for_stats(server: &QuicServer, cond: impl Fn(&QuicStats) -> bool) -> QuicStats {
    wait_until(WAIT, || cond(&server.stats()));
    server.stats()
}

/// The second connection resumes and sends its request as 0-RTT data; the echo app answers
/// it, and the server counts the resumption, the accepted early data and the early stream.
#[test]
fn a_resumed_connection_sends_0rtt_data_that_the_echo_app_answers() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = QuicServer::start(1, false, Duration::from_secs(30), None);
    let rt = current_thread();
    let config = resuming_client_config(&server.cert, ALPN_ECHO);
    let client = {
        let _guard = rt.enter();
        endpoint(&config)
    };
    let addr = server.addr();
    block_on(&rt, first_connection(&client, addr, 1));
    let before = wait_for_stats(&server, |s| s.accepted == 1);
    assert_eq!(
        (
            before.resumed,
            before.early_data_accepted,
            before.early_streams
        ),
        (0, 0, 0),
        "a full handshake: {before:?}"
    );
    assert!(
        block_on(&rt, zero_rtt_echo(&client, addr, 1)),
        "0-RTT accepted"
    );
    let after = wait_for_stats(&server, |s| s.resumed == 1 && s.early_data_accepted == 1);
    assert_eq!(after.accepted, 2, "{after:?}");
    assert_eq!(after.resumed, 1, "{after:?}");
    assert_eq!(after.early_data_accepted, 1, "{after:?}");
    assert_eq!(
        after.early_streams, 1,
        "the request came as early data: {after:?}"
    );
    assert_eq!(after.streams, 2, "{after:?}");
    // A ticket is good once (the resumed handshake issued new ones): a third connection
    // resumes with 0-RTT again on a fresh ticket.
    assert!(block_on(&rt, zero_rtt_echo(&client, addr, 1)));
    let third = wait_for_stats(&server, |s| s.resumed == 2);
    assert_eq!(
        (third.resumed, third.early_data_accepted),
        (2, 2),
        "{third:?}"
    );
}

/// With early data off (`--no-0rtt`) the client's ticket allows no 0-RTT (`into_0rtt` fails),
/// but the connection still resumes.
#[test]
fn without_0rtt_a_connection_still_resumes() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = QuicServer::start_configured(1, |q| q.early_data = false, |_| {});
    let rt = current_thread();
    let config = resuming_client_config(&server.cert, ALPN_ECHO);
    let client = {
        let _guard = rt.enter();
        endpoint(&config)
    };
    let addr = server.addr();
    block_on(&rt, first_connection(&client, addr, 1));
    block_on(&rt, async {
        let connecting = client.connect(addr, "localhost").expect("connect");
        let connecting = match connecting.into_0rtt() {
            Ok(_) => panic!("0-RTT offered by a server with early data off"),
            Err(connecting) => connecting,
        };
        let conn = connecting.await.expect("handshake");
        echo_once(&conn, 7, 300).await;
        conn.close(0u32.into(), b"done");
    });
    let stats = wait_for_stats(&server, |s| s.resumed == 1);
    assert_eq!(stats.accepted, 2, "{stats:?}");
    assert_eq!(stats.resumed, 1, "resumed without early data: {stats:?}");
    assert_eq!(stats.early_data_accepted, 0, "{stats:?}");
    assert_eq!(stats.early_streams, 0, "{stats:?}");
}

/// Which worker served what happened between `before` and now: the one whose received
/// datagrams grew by far the most (a connection of many echoes against a stray close).
fn busiest_worker(server: &QuicServer, before: &[u64]) -> usize {
    let mut deltas = Vec::new();
    wait_until(WAIT, || {
        deltas = server
            .server
            .worker_counters()
            .iter()
            .zip(before)
            .map(|(c, b)| c.rx_datagrams - b)
            .collect();
        deltas.iter().any(|&d| d >= 20)
    });
    let (worker, &most) = deltas.iter().enumerate().max_by_key(|(_, d)| **d).unwrap();
    let rest: u64 = deltas.iter().sum::<u64>() - most;
    assert!(
        most >= 20 && rest * 4 < most,
        "one worker served it: {deltas:?}"
    );
    worker
}

fn rx(server: &QuicServer) -> Vec<u64> {
    server
        .server
        .worker_counters()
        .iter()
        .map(|c| c.rx_datagrams)
        .collect()
}

/// Two workers share one session cache: the first connection to land on the other worker
/// (each attempt from a new client port, so the kernel's hash places it afresh) resumes with
/// 0-RTT on a ticket the first worker issued (every connection before it was on that one).
#[test]
fn a_ticket_from_one_worker_resumes_on_the_other() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = QuicServer::start(2, false, Duration::from_secs(30), None);
    let rt = current_thread();
    let config = resuming_client_config(&server.cert, ALPN_ECHO);
    let addr = server.addr();
    let first = {
        let _guard = rt.enter();
        endpoint(&config)
    };
    let before = rx(&server);
    block_on(&rt, first_connection(&first, addr, 30));
    let issuer = busiest_worker(&server, &before);
    for attempt in 0..32 {
        let client = {
            let _guard = rt.enter();
            endpoint(&config)
        };
        let before = rx(&server);
        let accepted = block_on(&rt, zero_rtt_echo(&client, addr, 30));
        assert!(accepted, "attempt {attempt}: 0-RTT accepted");
        let worker = busiest_worker(&server, &before);
        block_on(&rt, client.wait_idle());
        if worker != issuer {
            let stats = wait_for_stats(&server, |s| s.resumed == attempt + 1);
            assert_eq!(stats.resumed, attempt + 1, "{stats:?}");
            assert_eq!(stats.early_data_accepted, attempt + 1, "{stats:?}");
            return;
        }
    }
    panic!("32 client ports all hashed to worker {issuer}");
}
